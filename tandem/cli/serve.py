"""`tandem serve`: the OpenAI-compatible chat server and web chat page for a trained model.

    tandem serve --model runs/demo                           # http://127.0.0.1:8000/ (chat page)
    tandem serve --model runs/demo --backend torch:cpu:bf16 --port 9000 --max-batch 64
    TANDEM_API_KEY=k1,k2 tandem serve --model runs/demo --host 0.0.0.0   # clients send 'Bearer k1'

The port is bound before anything is announced (a taken port is one `error:` line, exit 2) and
opens at once; the model loads in the background (endpoints answer 503 until it is ready).
Ctrl-C or SIGTERM drains: new requests get 503 with Retry-After, in-flight ones get up to
--drain-timeout seconds (--shutdown-timeout is its older name) to finish, the rest end with a 503
(an error event on a stream), and the command exits 0. API keys: --api-key (repeatable), else
TANDEM_API_KEY (one key, or several separated by commas); with keys, every /v1/ route answers 401
without `Authorization: Bearer <key>`; /health, /metrics and the chat page stay open. Without a
key, listening on anything but loopback prints a warning. Engine faults (an engine step that
raises, returns NaN logits or outlasts --step-timeout) rebuild the engine and restart its requests,
at most --request-restarts times each; --fault and --fault-mtbf inject such faults (recovery.py).
See tandem/infer/server/ for the API.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from tandem.errors import TandemError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible chat server and web chat page")
    p.add_argument("--model", required=True, help="a tandem run folder, checkpoint folder or HF model folder")
    p.add_argument("--backend", help="torch:DEVICE[:DTYPE], e.g. torch:cpu:bf16 (overrides --device/--dtype)")
    p.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|npu[:i]|xpu|mps (default cpu)")
    p.add_argument("--dtype", default="fp32", help="fp32|bf16|fp16 (default fp32)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model id clients send (default: the model folder's name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting for a slot; beyond: 429 (default 256)")
    p.add_argument("--max-len", type=int, help="context length (default: the model's, at most 4096)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--seed", type=int, default=0, help="seeds requests that do not send one")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--drain-timeout", "--shutdown-timeout", dest="drain_timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM or Ctrl-C (default 10)")
    p.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ (repeatable; default: $TANDEM_API_KEY, "
                        "comma-separated)")
    p.add_argument("--step-timeout", type=float, default=300.0,
                   help="seconds an engine step may run before it counts as hung and the engine is rebuilt "
                        "(default 300)")
    p.add_argument("--request-restarts", type=int, default=2,
                   help="times a request is restarted after engine faults before it ends with an error (default 2)")
    p.add_argument("--fault", default="",
                   help="engine faults to inject, for tests and chaos runs: KIND@STEP,... with KIND device_error, "
                        "hang or nan (never on by default)")
    p.add_argument("--fault-mtbf", type=float, default=0.0,
                   help="also inject random engine faults, one every this many engine steps on average "
                        "(default 0: none)")
    p.add_argument("--fault-seed", type=int, default=0, help="seeds the --fault-mtbf draws (default 0)")
    return p


def _api_keys(flags: list[str] | None) -> tuple[str, ...]:
    """The --api-key values, else those of TANDEM_API_KEY (comma-separated); none is empty."""
    if flags is not None:
        where, keys = "--api-key", flags
    elif "TANDEM_API_KEY" in os.environ:
        where, keys = "TANDEM_API_KEY", [k.strip() for k in os.environ["TANDEM_API_KEY"].split(",")]
    else:
        return ()
    if not all(k.strip() for k in keys):
        raise TandemError(f"{where} holds an empty API key; give a non-empty key (unset TANDEM_API_KEY to serve "
                          f"without one)")
    return tuple(keys)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _device_dtype(args) -> tuple[str, str]:
    if not args.backend:
        return args.device, args.dtype
    from tandem.infer.backends import parse_backend
    spec = parse_backend(args.backend)
    if spec.kind != "torch":
        raise TandemError(f"tandem serve runs the torch backend only for now, got '{args.backend}'; "
                          f"use --backend torch:DEVICE[:DTYPE]")
    return spec.device, spec.dtype


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds it), or TandemError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, UnicodeError) as exc:
        sock.close()
        why = getattr(exc, "strerror", None) or str(exc)
        hint = ("another program listens there; pick another --port" if getattr(exc, "errno", None) == errno.EADDRINUSE
                else "check --host and --port")
        raise TandemError(f"cannot listen on {host}:{port}: {why}; {hint}") from None
    return sock


def cmd_serve(args) -> int:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1)):
        if value < low:
            raise TandemError(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise TandemError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.drain_timeout > 0:
        raise TandemError(f"--drain-timeout must be > 0 seconds, got {args.drain_timeout}")
    if not args.step_timeout > 0:
        raise TandemError(f"--step-timeout must be > 0 seconds, got {args.step_timeout}")
    if args.request_restarts < 0:
        raise TandemError(f"--request-restarts must be >= 0, got {args.request_restarts}")
    api_keys = _api_keys(args.api_keys)
    model = Path(args.model)
    if not model.exists():
        raise TandemError(f"model path not found: {model}")
    device, dtype = _device_dtype(args)
    from tandem import accel
    accel.resolve_dtype(dtype, accel.resolve_device(device))    # fail now, not in the background
    try:
        import uvicorn  # noqa: F401  (uvicorn_server runs it)

        from tandem.infer.server import ServeConfig, create_app, uvicorn_server
    except ImportError as exc:
        raise TandemError(f"tandem serve needs {exc.name}: pip install 'tandem[serve]'") from None
    from tandem.infer.server.recovery import EngineFaults
    from tandem.loading import load_model

    EngineFaults.parse(args.fault, args.fault_mtbf, args.fault_seed)     # a bad spec: one line now, exit 2

    accel.set_threads(args.threads)
    logger = logging.getLogger("tandem.serve")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler())
    name = args.name or model.resolve().name
    config = ServeConfig(name=name, max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_len,
                         max_body_bytes=args.max_body_bytes, seed=args.seed, api_keys=api_keys,
                         step_timeout=args.step_timeout, max_restarts=args.request_restarts, faults=args.fault,
                         fault_mtbf=args.fault_mtbf, fault_seed=args.fault_seed)
    failed: list[Exception] = []

    def on_load_error(exc: Exception) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(lambda: load_model(model, device, dtype), config, on_load_error)
    server = uvicorn_server(app, args.drain_timeout, host=args.host, port=args.port, log_level="warning")
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]                 # the one the system picked for --port 0
    print(f"serving {name} on http://{args.host}:{port}/ (OpenAI API under /v1; loading the model...)",
          flush=True)
    if not api_keys and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use the "
              f"model; set --api-key or TANDEM_API_KEY", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:        # uvicorn re-raises Ctrl-C (or SIGTERM, see uvicorn_server) once it has drained
        pass
    if failed:
        raise failed[0] if isinstance(failed[0], TandemError) else TandemError(f"loading the model failed: {failed[0]}")
    if not server.started:
        raise TandemError(f"could not listen on {args.host}:{args.port} (is the port in use?)")
    print("stopped", flush=True)
    return 0
