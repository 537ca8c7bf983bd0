"""Argument groups that several `tandem` subcommands share: a config (--preset/--config/--set/--out,
plus --supervise), a model to load (--model/--device/--dtype) and sampling settings."""

from __future__ import annotations

import argparse

from tandem.cli import chat, resilience


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a preset from configs/ (smoke, tiny, ...)")
    parser.add_argument("--config", help="a TOML config file instead of a preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field (repeatable), e.g. --set sft.steps=200")
    parser.add_argument("--out", required=True, help="the run folder (rerun into it to resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    resilience.add_supervise_args(parser)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a tandem run folder, checkpoint folder or HF model folder")
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|npu[:i]|xpu|mps (default cpu)")
    parser.add_argument("--dtype", default="fp32", help="fp32|bf16|fp16 (default fp32)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"reply length limit (default {chat.DEFAULT_NEW_TOKENS}, cut to the room "
                             f"the prompt leaves in the model's context)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
