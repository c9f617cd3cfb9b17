"""Paired overheads of interleaved benchmark timings, pooled over records, and their verdicts.

``diversedit bench`` times the variants round-robin on the CPU; a variant's overhead over the
base is the median over rounds of ``time / base time − 1`` with a distribution-free 95%
interval. On a shared machine one record's interval is often too wide to decide a target, so
:func:`pool` puts together the rounds of several records of the same measurement (size, batch,
dtype, device, step settings, machine and versions) and lists the code revisions it pooled.
A target is met or not only when the whole interval lies on one side of it (:func:`verdict`).
Standard library only: reading records needs no torch.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# what must agree for rounds to be pooled: the step's fields, the run's settings, the machine
STEP_KEYS = ("size", "device", "dtype", "batch", "accum", "compiled", "update", "diversity_triton")
STEP_DEFAULTS = {"accum": 1}  # what records made before a key was added measured
SETTING_KEYS = ("compile_mode", "compile_scope", "keep_freed_memory")
MACHINE_KEYS = ("cpu", "threads", "gpu", "torch", "triton", "torch_env")


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the k-th smallest and k-th largest
    values, for the largest k whose binomial coverage is at least ``level``; None when even the
    extremes cover less (fewer than 6 values at 95%)."""
    xs, n = sorted(values), len(values)
    k = 0
    while k < n // 2 and 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n >= level:
        k += 1
    return (xs[k - 1], xs[n - k]) if k else None


def round_ratios(times_ms: Sequence[float], base_ms: Sequence[float]) -> list[float]:
    """``time / base time − 1`` for the steps of each round (same length, same order)."""
    return [t / b - 1 for t, b in zip(times_ms, base_ms, strict=True)]


def paired_overhead(
    times_ms: Sequence[float], base_ms: Sequence[float]
) -> tuple[float, tuple[float, float] | None]:
    """Median over rounds of ``time / base time − 1`` for steps timed in the same round, and
    its 95% interval (:func:`median_ci`): slow drift of the machine cancels within a round."""
    return _median_and_ci(round_ratios(times_ms, base_ms))


def _median_and_ci(ratios: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    return statistics.median(ratios), median_ci(ratios)


def verdict(interval: tuple[float, float] | None, target: float) -> str:
    """``met`` when the whole interval is at or under ``target``, ``not met`` when it is wholly
    above, else ``undecided`` (also without an interval: too few rounds)."""
    if interval is None:
        return "undecided"
    low, high = interval
    return "met" if high <= target else "not met" if low > target else "undecided"


def _load(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON benchmark record ({err})") from None
    keys = ("machine", "settings", "train_step")
    kinds = (dict, dict, list)
    if not isinstance(record, dict) or any(
        not isinstance(record.get(k), kind) for k, kind in zip(keys, kinds, strict=True)
    ):
        raise ValueError(f"{path}: not a `diversedit bench` record (needs {', '.join(keys)})")
    return record


def _measurement(step: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """What a step's timings depend on besides the code."""
    settings, machine = record["settings"], record["machine"]
    return (
        {k: step.get(k, STEP_DEFAULTS.get(k)) for k in STEP_KEYS}
        | {k: settings.get(k) for k in SETTING_KEYS}
        | {f"machine.{k}": machine.get(k) for k in MACHINE_KEYS}
    )


def _key(step: dict[str, Any], record: dict[str, Any]) -> str:
    return json.dumps(_measurement(step, record), sort_keys=True)


def _revision(machine: dict[str, Any]) -> str:
    """A record's code: the commit's first 10 digits, ``+dirty`` for uncommitted changes."""
    return str(machine.get("git_commit", "unknown"))[:10] + "+dirty" * bool(machine.get("dirty"))


def pool(paths: Iterable[Path], base: str = "sit") -> tuple[list[dict[str, Any]], list[str]]:
    """The paired overhead of every variant over ``base`` in each record and pooled over
    records of the same measurement (:func:`_measurement`): one dict per measurement and
    variant, with its ``measurement``, ``rounds``, ``overhead`` (median), ``ci95``, the
    ``records`` (file, revision, rounds, median, interval) and the distinct ``revisions``
    pooled; and what was skipped, one ``file: reason`` line each (only interleaved rounds pair,
    and only with the base timed in the same record). A file that is not a benchmark record
    raises ValueError naming it.
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[str] = []
    for path in map(Path, paths):
        record = _load(path)
        steps = [s for s in record["train_step"] if isinstance(s, dict)]
        bases = {_key(s, record): s for s in steps if s.get("variant") == base}
        for step in steps:
            what = f"{path}: {step.get('size')} {step.get('variant')}"
            if step.get("variant") == base:
                continue
            if step.get("timing") != "interleaved" or not step.get("step_times_ms"):
                skipped.append(f"{what}: not timed in interleaved rounds")
                continue
            key = _key(step, record)
            if key not in bases or len(bases[key].get("step_times_ms") or ()) != len(
                step["step_times_ms"]
            ):
                skipped.append(f"{what}: no {base} timings in the same rounds")
                continue
            ratios = round_ratios(step["step_times_ms"], bases[key]["step_times_ms"])
            group = groups.setdefault((key, step["variant"]), {
                "measurement": _measurement(step, record), "variant": step["variant"],
                "base": base, "ratios": [], "records": [],
            })  # fmt: skip
            group["ratios"] += ratios
            overhead, ci = _median_and_ci(ratios)
            group["records"].append({
                "file": str(path), "revision": _revision(record["machine"]),
                "rounds": len(ratios), "overhead": overhead, "ci95": ci,
            })  # fmt: skip
    pooled = []
    for group in groups.values():
        ratios = group.pop("ratios")
        revisions = list(dict.fromkeys(r["revision"] for r in group["records"]))
        overhead, ci = _median_and_ci(ratios)
        pooled.append(group | {"rounds": len(ratios), "overhead": overhead, "ci95": ci,
                               "revisions": revisions})  # fmt: skip
    return pooled, skipped


def _interval(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "(too few rounds)"


def summary(
    pooled: Sequence[dict[str, Any]], skipped: Sequence[str] = (), target: float | None = None
) -> str:
    """A short table: per measurement and variant, each record's overhead and the pooled one
    (with its verdict against ``target``, a fraction, when given); then what was skipped."""
    lines = []
    for p in pooled:
        m = p["measurement"]
        lines.append(
            f"{m['size']} batch {m['batch']} {m['dtype']} {m['device']}: {p['variant']} over "
            f"{p['base']}"
        )
        for r in p["records"]:
            lines.append(
                f"  {r['file']} ({r['revision']}, {r['rounds']} rounds): {r['overhead']:+.1%} "
                f"{_interval(r['ci95'])}"
            )
        line = f"  pooled ({p['rounds']} rounds): {p['overhead']:+.1%} {_interval(p['ci95'])}"
        if target is not None:
            line += f": {verdict(p['ci95'], target)} at <= {target:.1%}"
        lines.append(line)
        if len(p["revisions"]) > 1:
            lines.append(f"  code revisions pooled: {', '.join(p['revisions'])}")
    return "\n".join(lines + [f"skipped {s}" for s in skipped])
