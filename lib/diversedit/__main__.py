"""Command line (``diversedit`` or ``python -m diversedit``): prepare, train, sample, evaluate,
reproduce, report, bench, overhead.

Exit codes: 0 done, 2 invalid parameters or a missing input path (an ``error: ...`` line;
nothing written), 85 preempted after a checkpoint (SIGTERM / SIGUSR1: requeue the job; it
resumes automatically).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


class UsageError(SystemExit):
    """Invalid parameters: :func:`main` prints ``error: <message>`` and the process exits with
    status 2 (``str()`` is the message, ``code`` is 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def _check_out(command: str, out: Path | None) -> None:
    """UsageError unless ``--out`` can be written (its folder is made)."""
    if out is None:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"diversedit {command}: --out {out}: {err.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"diversedit {command}: --out {out}: folder not writable")


def _bench(args: argparse.Namespace) -> None:
    from .bench import VARIANTS, check_options, run

    sizes, parts = args.sizes.split(","), args.parts.split(",")
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--accum", args.accum)):
        if value < 1:
            raise UsageError(f"diversedit bench: {flag} must be >= 1, got {value}")
    try:
        check_options(
            parts, args.compile_mode, args.compile_scope, sizes=sizes, variants=variants,
            device=args.device, diversity_triton=args.diversity_triton, update=args.update,
            peak_tflops=args.peak_tflops, interleave=args.interleave,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(f"diversedit bench: {err}") from None
    _check_out("bench", args.out)  # before minutes of timing, not after
    run(
        sizes,
        variants,
        device=args.device,
        batch=args.batch,
        dtype=args.dtype,
        compile_model=args.compile,
        out=args.out,
        parts=parts,
        steps=args.steps,
        interleave=args.interleave,
        compile_mode=args.compile_mode,
        compile_scope=args.compile_scope,
        profile=args.profile,
        diversity_triton=args.diversity_triton,
        update=args.update,
        peak_tflops=args.peak_tflops,
        accum=args.accum,
    )


def _overhead(args: argparse.Namespace) -> None:
    import json

    from .files import atomic_write_bytes
    from .overhead import pool, summary

    if args.target is not None and not 0 <= args.target <= 1:
        raise UsageError(
            f"diversedit overhead: --target {args.target}: a fraction from 0 to 1, e.g. 0.10 "
            "for 10%"
        )
    _check_out("overhead", args.out)
    try:
        pooled, skipped = pool(args.records, base=args.base, pairs=args.pairs)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not pooled:
        what = "process pairs" if args.pairs else "interleaved timings"
        raise UsageError(f"no {what} of a variant and {args.base!r} to pair:\n"
                         + "\n".join(skipped))  # fmt: skip
    print(summary(pooled, skipped, args.target))
    if args.out is not None:
        doc = {"base": args.base, "pairs": args.pairs, "target": args.target, "pooled": pooled,
               "skipped": skipped}  # fmt: skip
        atomic_write_bytes(args.out, json.dumps(doc, indent=2).encode())


def _evaluate(args: argparse.Namespace) -> None:
    from .metrics.evaluate import main as evaluate_main

    raise SystemExit(evaluate_main(args.rest))


def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    if args.published is not None and not args.published.is_dir():  # else no published numbers
        raise UsageError(f"--published {args.published}: no such directory of published numbers")
    print(f"report: {build_report(args.results, args.published).resolve()}")


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set optim.lr=2e-4")
        out[key] = value
    return out


def _train(args: argparse.Namespace) -> None:
    import json

    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.params, _overrides(args.set), check_paths=not args.dry_run)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        print(f"run directory: {cfg.run_dir()}")
        return
    from .train import ResumeError, train

    try:
        print(f"run directory: {train(cfg, max_steps=args.max_steps)}")
    except ResumeError as err:  # e.g. another process count than the checkpoint's
        raise UsageError(str(err)) from None


def _prepare(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .data.prepare import prepare_imagenet

    state = PartialState()  # one shard per process under `accelerate launch`
    done = prepare_imagenet(
        args.source,
        args.dest,
        vae=args.vae,
        resolution=args.resolution,
        batch_size=args.batch_size,
        device=state.device,
        process_index=state.process_index,
        num_processes=state.num_processes,
        limit=args.limit,
    )
    print(f"process {state.process_index}: encoded {done} images into {args.dest}")


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:  # its own parser (also `python -m diversedit.metrics.evaluate`)
        _evaluate(argparse.Namespace(rest=argv[1:]))
    if argv[:1] == ["reproduce"]:  # its own parser (also `python -m diversedit.runner`)
        from .runner import main as reproduce_main

        raise SystemExit(reproduce_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="diversedit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="ImageNet folder → ADM crops + SD-VAE latent moments")
    prep.add_argument("--source", type=Path, required=True, help="ImageFolder tree (train split)")
    prep.add_argument("--dest", type=Path, required=True, help="output: images/ and vae-sd/")
    prep.add_argument("--vae", default="stabilityai/sd-vae-ft-mse", help="local dir or hub id")
    prep.add_argument("--resolution", type=int, default=256)
    prep.add_argument("--batch-size", type=int, default=64)
    prep.add_argument("--limit", type=int, default=None, help="class-balanced subset size")
    prep.set_defaults(func=_prepare)
    train = sub.add_parser("train", help="train (or resume) the run a params file describes")
    train.add_argument("params", type=Path, help="params YAML file (see params/train/)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set optim.lr=2e-4 (repeatable)",
    )
    train.add_argument("--max-steps", type=int, default=None, help="stop early at this step")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the resolved configuration, then exit",
    )
    train.set_defaults(func=_train)
    from . import generate

    sample = sub.add_parser("sample", help="sample a run or checkpoint into an ADM .npz")
    generate.build_parser(sample)
    sample.set_defaults(func=generate.run_args)
    ev = sub.add_parser(
        "evaluate",
        help="FID, sFID, IS, Precision, Recall of REF.npz vs SAMPLES.npz",
        add_help=False,
    )
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_evaluate)
    sub.add_parser("reproduce", help="run the table notebooks with papermill (--tier smoke|paper)")
    report = sub.add_parser("report", help="aggregate results/ and render the HTML report")
    report.add_argument("--results", type=Path, default=Path("results"))
    report.add_argument(
        "--published",
        type=Path,
        default=None,
        help="published numbers (default: $DIVERSEDIT_PUBLISHED_DIR, else params/published)",
    )
    report.set_defaults(func=_report)
    bench = sub.add_parser(
        "bench", help="training step, diversity loss, sampler, Inception throughput; JSON out"
    )
    bench.add_argument("--sizes", default="tiny", help="comma list: tiny,S/2,B/2,L/2,XL/2")
    bench.add_argument("--variants", default="", help="comma list (default: all)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--batch", type=int, default=32, help="per-device batch (release: 32)")
    bench.add_argument(
        "--accum",
        type=int,
        default=1,
        help="micro-batches of --batch per training step, as optim.grad_accum (one GPU at the "
        "release's global batch 256: --batch 32 --accum 8)",
    )
    bench.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="autocast dtype (default: bf16 on CUDA, fp32 on the CPU)",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model and the diversity loss (and the sampling network)",
    )
    bench.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode for the model (with --compile): default, reduce-overhead, "
        "max-autotune, max-autotune-no-cudagraphs",
    )
    bench.add_argument(
        "--compile-scope",
        default="model",
        help="with --compile: 'model' (one graph) or 'blocks' (each transformer block alone)",
    )
    bench.add_argument(
        "--diversity-triton",
        action="store_true",
        help="training steps compute the diversity statistics with the Triton kernels (CUDA)",
    )
    bench.add_argument(
        "--update",
        default="library",
        help="how training steps clip, step AdamW and update the EMA: library, or fused into "
        "two passes by torch.compile (compiled) or Triton kernels (triton, CUDA); the optimizer "
        "part times a fused one against the library update",
    )
    bench.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed steps per measurement (compiled sampler: rounds against the eager one)",
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="record where each training variant and loss implementation spends its time "
        "(after its timing; each profile detaches CUPTI when it ends)",
    )
    bench.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the variants round-robin (default: on for CPU)",
    )
    bench.add_argument(
        "--parts",
        default="train,loss,sampler,inception",
        help="comma list: train,loss,optimizer,sampler,inception (sampler and inception time "
        "their own batches and repeats, recorded in the JSON; FLOPs and MFU are measured on "
        "CUDA only, peak memory on CUDA when variants are timed one after another and on the "
        "CPU always)",
    )
    bench.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak in TFLOP/s for MFU (default: from its name, for A100, "
        "H100 SXM/PCIe/NVL, H200 SXM/NVL, B200 and L40S)",
    )
    bench.add_argument("--out", type=Path, default=None, help="JSON file to write")
    bench.set_defaults(func=_bench)
    over = sub.add_parser(
        "overhead",
        help="each variant's paired overhead over a base variant (sit) in interleaved bench "
        "records, pooled over records of the same measurement; the verdict against a target",
    )
    over.add_argument("records", type=Path, nargs="+", help="bench JSON records")
    over.add_argument("--base", default="sit", help="the variant the others are paired with")
    over.add_argument(
        "--pairs",
        action="store_true",
        help="the records come two by two, each variant timed alone in its own process: a "
        "record of the base, then one of the other variants; each pair gives one ratio of "
        "median steps (for variants that do not fit in memory together)",
    )
    over.add_argument(
        "--target",
        type=float,
        default=None,
        help="e.g. 0.10: met when the whole 95%% interval is at or under it, not met when it "
        "is wholly above, else undecided",
    )
    over.add_argument("--out", type=Path, default=None, help="JSON file to write")
    over.set_defaults(func=_overhead)
    args = parser.parse_args(argv)
    # a missing input (e.g. a run directory to sample) is bad input; in training or a
    # benchmark it would be a crash, whose traceback is kept
    bad_input = (UsageError,) if args.func in (_train, _bench) else (UsageError, FileNotFoundError)
    try:
        args.func(args)
    except bad_input as err:
        print(f"error: {err}", file=sys.stderr)
        raise UsageError(str(err)) from None
    except KeyboardInterrupt:  # Ctrl-C: what was written is complete (atomic writes)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
