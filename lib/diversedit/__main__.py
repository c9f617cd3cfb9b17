"""Command line: ``diversedit bench …`` (``python -m diversedit``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _bench(args: argparse.Namespace) -> None:
    from .bench import VARIANTS, run

    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    run(
        args.sizes.split(","),
        variants,
        device=args.device,
        batch=args.batch,
        dtype=args.dtype,
        compile_model=args.compile,
        out=args.out,
        samplers=not args.no_samplers,
        steps=args.steps,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diversedit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="training-step and sampler throughput, JSON out")
    bench.add_argument("--sizes", default="tiny", help="comma list: tiny,S/2,B/2,L/2,XL/2")
    bench.add_argument("--variants", default="", help="comma list (default: all)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--batch", type=int, default=32, help="per-device batch (release: 32)")
    bench.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    bench.add_argument("--compile", action="store_true", help="torch.compile the model")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    bench.add_argument("--no-samplers", action="store_true")
    bench.add_argument("--out", type=Path, default=None, help="JSON file to write")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
