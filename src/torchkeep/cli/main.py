"""Entry point of the ``torchkeep`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from torchkeep.errors import TorchkeepError
from torchkeep.weights.inspect import inspect
from torchkeep.weights.verify import verify


def _inspect(args: argparse.Namespace) -> int:
    info = inspect(args.path)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    elif args.tree:
        print(info.tree())
    else:
        print(info)
    return 0


def _verify(args: argparse.Namespace) -> int:
    checked = verify(args.path)
    if checked is None:
        print(f"{args.path}: no checksums recorded (not written by torchkeep); structure is valid")
    else:
        print(f"{args.path}: OK, {checked} tensors verified")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from torchkeep.cli.demo import run

    return run(args.dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchkeep", description="Save, load and inspect PyTorch weights safely.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the tensors, totals and metadata of a weights file or folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tree", action="store_true", help="parameter counts as a module tree")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="check every tensor against its checksum (exit 1 on damage)")
    p.add_argument("path")
    p.set_defaults(func=_verify)
    p = sub.add_parser("demo", help="train the Iris classifier, save, load and partially load it")
    p.add_argument("--dir", default="torchkeep-demo", help="folder to write into (default ./torchkeep-demo)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TorchkeepError as exc:
        print(f"torchkeep: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
