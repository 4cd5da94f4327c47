"""``nnunet_transfer`` command line: one module per subcommand, each thin over an importable API.

Every subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Modules keep heavy
imports (torch, nnU-Net) inside ``run`` so that ``--help`` and ``trainer-path`` stay instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_transfer import __version__
from nnunet_transfer.errors import TransferError

# Order is the order of ``--help``.
SUBCOMMANDS = [
    "trainer_path",
    "doctor",
    "configure",
    "blocks",
    "demo",
    "plans",
    "weights",
    "lora",
    "labels",
    "pool",
    "analyze",
    "splits",
    "evaluate",
    "compare",
    "study",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_transfer",
        description="Transfer learning for nnU-Net v2. Trainers run through the stock nnUNetv2_train "
                    "once nnUNet_extTrainer points at `nnunet_transfer trainer-path`.")
    parser.add_argument("--version", action="version", version=f"nnunet-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"nnunet_transfer.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (tests call this in-process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "trust_checkpoint", False):
            from nnunet_transfer.checkpoints import trusting_checkpoints  # torch: only when asked for

            with trusting_checkpoints():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except TransferError as e:
        print(f"nnunet_transfer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
