"""Training: SFT, checkpoints (and later GRPO, roles, resilience)."""
