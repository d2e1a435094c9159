"""The ``droprnn`` command (also ``python -m droprnn``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="droprnn", description="Recurrent dropout done right, in PyTorch.")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="show where each dropout placement drops (the default)")
    demo.add_argument("--steps", type=int, default=12, help="timesteps of the example sequence")
    demo.add_argument("--features", type=int, default=10, help="input features and GRU units")
    demo.add_argument("--rate", type=_rate, default=0.5, help="dropout rate of every placement")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        from . import demo as demo_module

        if args.command is None:
            args = demo.parse_args([])
        if args.steps <= 0 or args.features <= 0:
            parser.error("--steps and --features must be positive")
        demo_module.run(steps=args.steps, features=args.features, units=args.features, rate=args.rate, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
