"""Training on hardware that crashes, hangs or silently corrupts data.

Inside a training process (train/sft.py and train/grpo.py call the same hooks):
    faults.py     fault schedules and their injection (resilience.faults, resilience.mtbf)
    guard.py      the NaN / spike guard: skip, roll back, give up (TrainingFailed, exit 3)
    replicas.py   fingerprints and the silent-corruption vote across replicas or trainer ranks
    incidents.py  runs/NAME/incidents.jsonl, heartbeat-ROLE.json and the JSON-lines helpers
Around it (imported by the CLI only):
    supervisor.py restart a crashed or hung job (--supervise)
    chaos.py      `tandem chaos`: a job under injected faults next to a fault-free twin
Beside it (benchmarks and tests):
    outside.py    SIGKILL / SIGSTOP sent to a supervised job from another process at random moments
"""
