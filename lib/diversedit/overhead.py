"""Paired overheads of interleaved benchmark timings, pooled over records, and their verdicts.

``diversedit bench`` times the variants round-robin on the CPU; a variant's overhead over the
base is the median over rounds of ``time / base time − 1`` with a distribution-free 95%
interval. On a shared machine one record's interval is often too wide to decide a target, so
:func:`pool` puts together the rounds of several records of the same measurement (size, batch,
dtype, device, step settings, machine and versions) and lists the code revisions it pooled.
A target is met or not only when the whole interval lies on one side of it (:func:`verdict`).
Where two variants do not fit in memory together (SiT-XL/2 on a 24 GiB CPU machine), each is
timed alone in its own process, in turn: :func:`pool` with ``pairs`` reads such records two by
two, and each pair gives one ratio of median steps. Standard library only: reading records
needs no torch.
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


def _median_ms(step: dict[str, Any]) -> float:
    """A step's median time: over its recorded steps, else the record's ``step_ms``."""
    times = step.get("step_times_ms")
    return statistics.median(times) if times else step["step_ms"]


def _add(
    groups: dict[tuple[str, str], dict[str, Any]], step: dict[str, Any], record: dict[str, Any],
    base: str, ratios: list[float], entry: dict[str, Any],
) -> None:  # fmt: skip
    """Add a record's (or a pair's) ratios to the group of its measurement and variant."""
    group = groups.setdefault((_key(step, record), step["variant"]), {
        "measurement": _measurement(step, record), "variant": step["variant"], "base": base,
        "ratios": [], "records": [],
    })  # fmt: skip
    group["ratios"] += ratios
    overhead, ci = _median_and_ci(ratios)
    group["records"].append(entry | {"rounds": len(ratios), "overhead": overhead, "ci95": ci})


def _rounds(
    paths: Sequence[Path], base: str, groups: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    """Group the per-round ratios of interleaved records; return what was skipped."""
    skipped = []
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
            entry = {"file": str(path), "revision": _revision(record["machine"])}
            _add(groups, step, record, base, ratios, entry)
    return skipped


def _pairs(
    paths: Sequence[Path], base: str, groups: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    """Group the ratios of records given two by two, a ``base`` record and then a record of
    other variants, each timed alone in its own process; return what was skipped."""
    if len(paths) % 2:
        raise ValueError(
            f"--pairs: {len(paths)} records, an odd number; give a {base} record and then a "
            "record of the other variants for each pair"
        )
    skipped = []
    for base_path, path in zip(paths[::2], paths[1::2], strict=True):
        base_record, record = _load(base_path), _load(path)
        firsts = [s for s in base_record["train_step"] if isinstance(s, dict)]
        bases = {_key(s, base_record): s for s in firsts}
        if not firsts or any(s.get("variant") != base for s in firsts):
            skipped.append(f"{base_path}: not a record of {base} alone, the first of a pair")
            continue
        steps = [s for s in record["train_step"] if isinstance(s, dict)]
        if any(s.get("variant") == base for s in steps):
            skipped.append(f"{path}: holds {base} too, not the second record of a pair")
            continue
        for step in steps:
            what = f"{path}: {step.get('size')} {step.get('variant')}"
            key = _key(step, record)
            if key not in bases:
                skipped.append(f"{what}: another measurement than {base_path}'s {base}")
            else:
                ratio = _median_ms(step) / _median_ms(bases[key]) - 1
                revision = _revision(record["machine"])
                if (base_revision := _revision(base_record["machine"])) != revision:
                    revision = f"{base_revision} / {revision}"
                entry = {"file": str(path), "base_file": str(base_path), "revision": revision}
                _add(groups, step, record, base, [ratio], entry)
    return skipped


def pool(
    paths: Iterable[Path], base: str = "sit", pairs: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """The paired overhead of every variant over ``base`` in each record and pooled over
    records of the same measurement (:func:`_measurement`): one dict per measurement and
    variant, with its ``measurement``, ``rounds``, ``overhead`` (median), ``ci95``, the
    ``records`` (file, revision, rounds, median, interval) and the distinct ``revisions``
    pooled; and what was skipped, one ``file: reason`` line each (only interleaved rounds pair,
    and only with the base timed in the same record). With ``pairs`` the records are read two
    by two instead (:func:`_pairs`): each pair is one round, the ratio of its median steps, and
    ``unit`` says ``process pairs``. A file that is not a benchmark record raises ValueError
    naming it.
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    skipped = (_pairs if pairs else _rounds)(list(map(Path, paths)), base, groups)
    pooled = []
    for group in groups.values():
        ratios = group.pop("ratios")
        revisions = list(dict.fromkeys(r["revision"] for r in group["records"]))
        overhead, ci = _median_and_ci(ratios)
        pooled.append(group | {"rounds": len(ratios), "overhead": overhead, "ci95": ci,
                               "revisions": revisions,
                               "unit": "process pairs" if pairs else "rounds"})  # fmt: skip
    return pooled, skipped


def _interval(ci: tuple[float, float] | None, unit: str = "rounds") -> str:
    return f"[{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else f"(too few {unit})"


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
            if "base_file" in r:  # a process pair: one ratio, no interval
                lines.append(f"  {r['base_file']}, {r['file']} ({r['revision']}): "
                             f"{r['overhead']:+.1%}")  # fmt: skip
                continue
            lines.append(
                f"  {r['file']} ({r['revision']}, {r['rounds']} rounds): {r['overhead']:+.1%} "
                f"{_interval(r['ci95'])}"
            )
        unit = p.get("unit", "rounds")
        line = f"  pooled ({p['rounds']} {unit}): {p['overhead']:+.1%} {_interval(p['ci95'], unit)}"
        if target is not None:
            line += f": {verdict(p['ci95'], target)} at <= {target:.1%}"
        lines.append(line)
        if len(p["revisions"]) > 1:
            lines.append(f"  code revisions pooled: {', '.join(p['revisions'])}")
    return "\n".join(lines + [f"skipped {s}" for s in skipped])
