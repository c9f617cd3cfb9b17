"""Results as files: published numbers, per-row ``metrics.json`` and their aggregation.

Layout: ``results/<table>/<tier>/<row>/metrics.json`` (one :class:`RowResult`, written atomically as
the last action of a notebook run); published numbers live in ``params/published/<stem>.yaml``.
:func:`aggregate` joins the two into one long table, one row per (table, row, tier, metric).

Honesty rules (evaluation-spec §6): FID/sFID/IS/Precision/Recall are names reserved for the real
Inception; any other extractor's metrics are ``FD_<tag>``, ``IS_<tag>``…, and a number is
``comparable`` with the paper only for the paper tier, an Inception metric and N ≥ 50,000.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .files import atomic_write_bytes

TIERS = ("paper", "mini", "smoke")
PAPER_METRICS = ("FID", "sFID", "IS", "Precision", "Recall")
PAPER_N = 50_000
RESULT_STATUSES = ("done", "diverged")
PUBLISHED_STATUSES = ("diverges",)
ROW_KINDS = ("reproduce", "reference")
# The real 2015-12-05 Inception as named by the metric code (``metrics.extractors.INCEPTION_NAME``;
# not imported to keep this module free of torch) and ADM's own evaluator.
INCEPTION_EXTRACTORS = ("inception-v3-compat", "adm-evaluator")

_TABLE = re.compile(r"^([tf]\d{2})(?:_[a-z0-9_]+)?$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SUFFIXED = re.compile(r"^(FD|sFD|IS|Precision|Recall)_[A-Za-z0-9][A-Za-z0-9_.()=-]*$")
_FAMILY = {"FD": "FID", "sFD": "sFID", "IS": "IS", "Precision": "Precision", "Recall": "Recall"}
_DOC_KEYS = {"table", "kind", "title", "source", "setting", "description", "rows"}
_ROW_KEYS = {
    "row", "label", "metrics", "baseline", "source", "status", "kind", "reference_for", "note",
    "epochs", "nfe", "adaptive_range",
}  # fmt: skip

COLUMNS = [
    "table", "row", "label", "tier", "metric", "paper_metric", "reproduced", "published", "delta",
    "comparable", "baseline_row", "gain_vs_baseline", "published_gain", "extractor", "N", "N_ref",
    "status", "published_status", "kind", "source", "run_dir", "train_steps", "config_hash",
    "created",
]  # fmt: skip


class PublishedError(ValueError):
    """A published-numbers file violates the schema."""


# --- metric names --------------------------------------------------------------------------------


def paper_metric(name: str) -> str | None:
    """The paper metric a result metric corresponds to: FID for FID and FD_<tag>, … (else None)."""
    if name in PAPER_METRICS:
        return name
    m = _SUFFIXED.match(name)
    return _FAMILY[m.group(1)] if m else None


def is_real_inception(extractor: str | None) -> bool:
    return bool(extractor) and str(extractor).strip().lower() in INCEPTION_EXTRACTORS


def table_id(name: str) -> str:
    """``t01`` for ``t01`` or ``t01_model_scales``."""
    m = _TABLE.match(name)
    if not m:
        raise ValueError(f"table {name!r} is not 'tNN' / 'fNN' (optionally '_<slug>')")
    return m.group(1)


def metric_order(name: str) -> tuple[int, str]:
    """Sort key: the paper's metric order (FID, sFID, IS, Precision, Recall), then other names
    in the order given (a stable sort keeps, e.g., the CKA figure's runs as the notebook wrote)."""
    fam = paper_metric(name)
    return (PAPER_METRICS.index(fam), name) if fam else (len(PAPER_METRICS), "")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --- published numbers ---------------------------------------------------------------------------


def default_published_dir() -> Path:
    """``$DIVERSEDIT_PUBLISHED_DIR``, else the repository's ``params/published``, else the cwd's."""
    env = os.environ.get("DIVERSEDIT_PUBLISHED_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "params" / "published"
    return repo if repo.is_dir() else Path.cwd() / "params" / "published"


def validate_published(doc: Any, stem: str | None = None) -> list[str]:
    """Every schema problem of one published-numbers document (empty when valid)."""
    if not isinstance(doc, Mapping):
        return ["the document is not a mapping"]
    errs = [f"unknown key {k!r}" for k in doc if k not in _DOC_KEYS]
    errs += [
        f"missing key {k!r}"
        for k in ("table", "title", "source", "setting", "rows")
        if k not in doc
    ]
    tid = doc.get("table")
    if not isinstance(tid, str) or not re.fullmatch(r"[tf]\d{2}", tid):
        errs.append(f"table {tid!r} is not 'tNN' or 'fNN'")
    elif stem is not None and (not _TABLE.match(stem) or table_id(stem) != tid):
        errs.append(f"table {tid!r} does not match the file name {stem!r}")
    for key in ("title", "source"):
        if key in doc and not (isinstance(doc[key], str) and doc[key].strip()):
            errs.append(f"{key} must be a non-empty string")
    if "setting" in doc and not isinstance(doc["setting"], Mapping):
        errs.append("setting must be a mapping")
    kind = doc.get("kind", "table")
    rows = doc.get("rows")
    if kind not in ("table", "figure"):
        errs.append(f"kind {kind!r} is not 'table' or 'figure'")
    if not isinstance(rows, list):
        return [*errs, "rows must be a list"]
    if kind == "figure":
        if rows:
            errs.append("a figure has no rows")
        if not isinstance(doc.get("description"), str):
            errs.append("a figure needs a description")
        return errs
    if not rows:
        errs.append("a table needs rows")
    slugs = [r.get("row") for r in rows if isinstance(r, Mapping)]
    for i, r in enumerate(rows):
        errs += [f"rows[{i}]: {e}" for e in _row_errors(r, slugs)]
    dup = sorted({s for s in slugs if isinstance(s, str) and slugs.count(s) > 1})
    errs += [f"duplicate row {s!r}" for s in dup]
    return errs


def _row_errors(r: Any, slugs: list[Any]) -> list[str]:
    if not isinstance(r, Mapping):
        return ["not a mapping"]
    errs = [f"unknown key {k!r}" for k in r if k not in _ROW_KEYS]
    slug = r.get("row")
    if not (isinstance(slug, str) and _SLUG.match(slug)):
        errs.append(f"row {slug!r} is not a lower-case slug")
    if not (isinstance(r.get("label"), str) and r["label"].strip()):
        errs.append("label must be a non-empty string")
    metrics = r.get("metrics", {})
    if not isinstance(metrics, Mapping):
        return [*errs, "metrics must be a mapping"]
    for name, v in metrics.items():
        if name not in PAPER_METRICS:
            errs.append(f"metric {name!r} is not one of {PAPER_METRICS}")
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            errs.append(f"metric {name}: {v!r} is not a positive number")
        elif name in ("Precision", "Recall") and v > 1:
            errs.append(f"metric {name}: {v} > 1")
    status = r.get("status")
    if status is not None and status not in PUBLISHED_STATUSES:
        errs.append(f"status {status!r} is not one of {PUBLISHED_STATUSES}")
    if not metrics and status is None:
        errs.append("a row needs metrics or a status")
    if r.get("kind", "reproduce") not in ROW_KINDS:
        errs.append(f"kind {r.get('kind')!r} is not one of {ROW_KINDS}")
    for key in ("baseline", "reference_for"):
        ref = r.get(key)
        if ref is not None and (ref not in slugs or ref == slug):
            errs.append(f"{key} {ref!r} is not another row of this table")
    for key in ("epochs", "nfe"):
        v = r.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            errs.append(f"{key} {v!r} is not a positive integer")
    src = r.get("source")
    if src is not None and not (isinstance(src, str) and src.strip()):
        errs.append("source must be a non-empty string")
    return errs


def _published_path(path_or_stem: str | Path, published_dir: str | Path | None) -> Path:
    p = Path(path_or_stem)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    base = Path(published_dir) if published_dir is not None else default_published_dir()
    if (base / f"{p.name}.yaml").is_file():
        return base / f"{p.name}.yaml"
    hits = sorted(base.glob(f"{p.name}_*.yaml")) if _TABLE.match(p.name) else []
    if len(hits) == 1:
        return hits[0]
    raise FileNotFoundError(f"no published numbers {path_or_stem!r} (looked in {base})")


def load_published(path_or_stem: str | Path, published_dir: str | Path | None = None) -> dict:
    """Load and validate one published-numbers file (a path, a stem or a table id).

    Rows are normalised: ``source`` (the table's unless overridden), ``baseline``, ``status``,
    ``reference_for``, ``note`` default to None, ``kind`` to "reproduce", ``metrics`` to floats."""
    path = _published_path(path_or_stem, published_dir)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PublishedError(f"{path}: invalid YAML: {e}") from e
    errs = validate_published(doc, path.stem)
    if errs:
        raise PublishedError(f"{path}:\n  " + "\n  ".join(errs))
    out = dict(doc)
    out["kind"] = doc.get("kind", "table")
    out["stem"], out["path"] = path.stem, str(path)
    out["rows"] = [
        {
            "source": doc["source"],
            "baseline": None,
            "status": None,
            "kind": "reproduce",
            "reference_for": None,
            "note": None,
            **r,
            "metrics": {k: float(v) for k, v in (r.get("metrics") or {}).items()},
        }
        for r in doc["rows"]
    ]
    return out


def load_all_published(published_dir: str | Path | None = None) -> dict[str, dict]:
    """Every ``<dir>/*.yaml``, keyed by table id in file-name order."""
    base = Path(published_dir) if published_dir is not None else default_published_dir()
    out: dict[str, dict] = {}
    for path in sorted(base.glob("*.yaml")):
        doc = load_published(path)
        if doc["table"] in out:
            raise PublishedError(f"table {doc['table']} appears in two files ({path})")
        out[doc["table"]] = doc
    return out


# --- per-row results -----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RowResult:
    """One reproduced row of one table at one tier (the content of ``metrics.json``).

    ``metric_info`` must hold ``N_samples``, ``N_ref`` (ints), ``extractor`` (its name, e.g.
    "inception-v3-compat" or "digits-cnn (stand-in)") and ``sampler`` (a dict of sampler settings).
    A ``diverged`` result (training stopped on a non-finite loss) has no metrics and holds the
    stop's ``error`` and ``step`` instead. ``baseline`` names the row's own baseline row when the
    published file does not."""

    table: str
    row: str
    tier: str
    label: str
    metrics: dict[str, float]
    metric_info: dict[str, Any]
    run_dir: str | None = None
    config_hash: str | None = None
    train_steps: int | None = None
    created: str = field(default_factory=_now)
    status: str = "done"
    baseline: str | None = None

    def __post_init__(self) -> None:
        if self.run_dir is not None:
            self.run_dir = str(self.run_dir)
        if not isinstance(self.metrics, Mapping):
            raise ValueError(f"metrics must be a mapping, got {type(self.metrics).__name__}")
        self.metrics = {str(k): float(v) if _is_number(v) else v for k, v in self.metrics.items()}
        errs = self.errors()
        if errs:
            raise ValueError(
                f"invalid result {self.table}/{self.tier}/{self.row}: " + "; ".join(errs)
            )

    def errors(self) -> list[str]:
        errs = []
        if not isinstance(self.table, str) or not _TABLE.match(self.table):
            errs.append(f"table {self.table!r} is not 'tNN[_slug]'")
        if not isinstance(self.row, str) or not _SLUG.match(self.row):
            errs.append(f"row {self.row!r} is not a lower-case slug")
        if self.tier not in TIERS:
            errs.append(f"tier {self.tier!r} is not one of {TIERS}")
        if self.status not in RESULT_STATUSES:
            errs.append(f"status {self.status!r} is not one of {RESULT_STATUSES}")
        if not (isinstance(self.label, str) and self.label.strip()):
            errs.append("label must be a non-empty string")
        if self.baseline is not None and not (
            isinstance(self.baseline, str) and _SLUG.match(self.baseline)
        ):
            errs.append(f"baseline {self.baseline!r} is not a slug")
        if self.train_steps is not None and (
            not isinstance(self.train_steps, int) or isinstance(self.train_steps, bool)
        ):
            errs.append("train_steps must be an int or None")
        info = self.metric_info if isinstance(self.metric_info, Mapping) else {}
        if not isinstance(self.metric_info, Mapping):
            errs.append("metric_info must be a mapping")
        if self.status == "diverged":  # training stopped: no samples, no metrics
            if self.metrics:
                errs.append("a diverged result has no metrics")
            if not (isinstance(info.get("error"), str) and info["error"].strip()):
                errs.append("metric_info['error'] must say how the run diverged")
            return errs
        for key in ("N_samples", "N_ref"):
            v = info.get(key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                errs.append(f"metric_info[{key!r}] must be a positive int, got {v!r}")
        if not (isinstance(info.get("extractor"), str) and info["extractor"].strip()):
            errs.append("metric_info['extractor'] must name the feature extractor")
        if not isinstance(info.get("sampler"), Mapping):
            errs.append("metric_info['sampler'] must be a dict of sampler settings")
        if self.status == "done" and not self.metrics:
            errs.append("a done result needs metrics")
        for name, v in self.metrics.items():
            if not isinstance(v, float) or (self.status == "done" and not math.isfinite(v)):
                errs.append(f"metric {name}: {v!r} is not a finite number")
            if name in PAPER_METRICS and not is_real_inception(info.get("extractor")):
                errs.append(
                    f"metric name {name!r} is reserved for the real Inception; extractor "
                    f"{info.get('extractor')!r} must report FD_<tag>/IS_<tag>/… instead"
                )
        return errs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RowResult:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown result keys {unknown}")
        return cls(**dict(d))


def result_path(result: RowResult, results_dir: str | Path) -> Path:
    return Path(results_dir) / result.table / result.tier / result.row / "metrics.json"


def write_result(result: RowResult, results_dir: str | Path) -> Path:
    """Write ``<results_dir>/<table>/<tier>/<row>/metrics.json`` atomically; returns its path."""
    result.__post_init__()  # re-validate: fields may have been mutated since construction
    path = result_path(result, results_dir)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=True) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def read_results(results_dir: str | Path) -> list[RowResult]:
    """Every ``<table>/<tier>/<row>/metrics.json`` under ``results_dir`` (sorted by path)."""
    base = Path(results_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"results directory {base} does not exist")
    out, seen = [], {}
    for path in sorted(base.glob("*/*/*/metrics.json")):
        try:
            res = RowResult.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:  # removed since the listing: a row being rerun beside us
            continue
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e
        rel = path.relative_to(base).parts[:3]
        if rel != (res.table, res.tier, res.row):
            raise ValueError(f"{path} holds {res.table}/{res.tier}/{res.row}")
        key = (table_id(res.table), res.tier, res.row)
        if key in seen:
            raise ValueError(f"{path} duplicates {seen[key]}")
        seen[key] = path
        out.append(res)
    return out


# --- aggregation ---------------------------------------------------------------------------------


def _pending_metrics(prow: Mapping[str, Any], observed: list[str]) -> list[str]:
    pub = list(prow["metrics"])
    if not observed:
        return pub or ["FID"]
    names = [m for m in observed if paper_metric(m) in pub]
    return names or [_primary(observed)]


def _primary(names: Iterable[str]) -> str:
    names = sorted(names, key=metric_order)
    return next((m for m in names if paper_metric(m) == "FID"), names[0] if names else "FID")


def row_file_tiers(params_dir: str | Path, stem: str) -> set[str]:
    """The tiers with at least one row file ``<params_dir>/<stem>/<tier>/*.yaml``."""
    return {t for t in TIERS if any(Path(params_dir, stem, t).glob("*.yaml"))}


# what the stand-in extractors report (metrics.extractors), by a row file's ``extractor``
STANDIN_METRICS = {"digits-cnn": ("FD_digits", "IS_digits", "Precision_digits", "Recall_digits")}


def row_file_metrics(params_dir: str | Path, stem: str, tier: str) -> list[str]:
    """The metric names a tier's rows will report, before any of them has a result: a stand-in
    extractor's names when every row file uses that one (a pending smoke row is not an "FID"),
    else none (the paper's names)."""
    import yaml

    extractors = {
        (yaml.safe_load(path.read_text()) or {}).get("extractor")
        for path in Path(params_dir, stem, tier).glob("*.yaml")
    }
    only = extractors.pop() if len(extractors) == 1 else None
    return list(STANDIN_METRICS.get(only, ()))


def row_file_labels(params_dir: str | Path, stem: str, tier: str) -> dict[str, str]:
    """``{row slug: display label}`` of a tier's row files (the label defaults to the slug)."""
    import yaml

    out = {}
    for path in sorted(Path(params_dir, stem, tier).glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        out[str(doc.get("row", path.stem))] = str(doc.get("label") or path.stem)
    return out


def aggregate(
    results_dir: str | Path,
    published_dir: str | Path | None = None,
    params_dir: str | Path | None = None,
):
    """One row per (table, row, tier, metric): reproduced vs published, Δ, in-pipeline gain.

    Published rows of kind "reproduce" without a result appear as status "pending" with NaN
    ``reproduced`` for every tier that has results for the table, always for the paper tier and,
    given ``params_dir`` (e.g. ``params``), for every tier with row files
    ``<params_dir>/<stem>/<tier>/*.yaml`` (rows that can be run but have not been).
    ``gain_vs_baseline`` = this row − its baseline row (same table, tier and metric);
    ``published_gain`` is the same difference in the published numbers. A figure (no published
    numbers, e.g. f01) with results gets, given ``params_dir``, its other row files as pending
    rows, with the metric names its results report."""
    import pandas as pd

    docs = load_all_published(published_dir)
    published = {k: v for k, v in docs.items() if v["kind"] == "table"}
    done = {(table_id(r.table), r.tier, r.row): r for r in read_results(results_dir)}
    extra_tables = sorted({t for t, _, _ in done} - set(published))
    records: list[dict[str, Any]] = []
    for tid in [*published, *extra_tables]:
        doc = published.get(tid)
        prows = {r["row"]: r for r in doc["rows"]} if doc else {}
        tiers = {tier for t, tier, _ in done if t == tid} | ({"paper"} if doc else set())
        if doc and params_dir is not None:
            tiers |= row_file_tiers(params_dir, doc["stem"])
        figure = docs.get(tid) if doc is None and params_dir is not None else None
        if figure is not None:
            tiers |= row_file_tiers(params_dir, figure["stem"])
            reported = [m for (t, _, _), r in done.items() if t == tid for m in r.metrics]
            reported = list(dict.fromkeys(reported))
        for tier in sorted(tiers, key=TIERS.index):
            here = {row: r for (t, ti, row), r in done.items() if t == tid and ti == tier}
            names = dict.fromkeys(m for r in here.values() for m in r.metrics)
            observed = sorted(names, key=metric_order)
            if not observed and doc and params_dir is not None:
                observed = row_file_metrics(params_dir, doc["stem"], tier)
            order = [s for s, p in prows.items() if p["kind"] == "reproduce" or s in here]
            order += sorted(set(here) - set(order))
            for slug in order:
                records += _records(tid, tier, prows, slug, here.get(slug), observed)
            if figure is not None and reported:
                files = row_file_labels(params_dir, figure["stem"], tier)
                for slug, label in files.items():
                    if slug not in here:
                        row = {slug: {**_UNPUBLISHED, "label": label}}
                        records += _records(tid, tier, row, slug, None, reported, reported)
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df = _add_gains(df, published)
    for col in ("reproduced", "published", "delta", "gain_vs_baseline", "published_gain"):
        df[col] = df[col].astype("float64")
    df["comparable"] = df["comparable"].astype(bool)
    for col in ("N", "N_ref", "train_steps"):
        df[col] = df[col].astype("Int64")
    return df


_UNPUBLISHED = {
    "metrics": {},
    "baseline": None,
    "status": None,
    "kind": "unpublished",
    "source": None,
}


def _records(
    tid: str,
    tier: str,
    prows: Mapping[str, Mapping[str, Any]],
    slug: str,
    res: RowResult | None,
    observed: list[str],
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The aggregate's records of one row: its result's metrics, else ``names`` or the names
    it will report (pending)."""
    p = prows.get(slug)
    if res is not None:
        names = sorted(res.metrics, key=metric_order) or [_primary(observed)]
    elif names is None:
        names = _pending_metrics(p, observed)
    info = res.metric_info if res else {}
    n = info.get("N_samples")
    out = []
    for m in names:
        fam = paper_metric(m)
        pub = p["metrics"].get(fam) if p and fam else None
        rep = res.metrics.get(m) if res else None
        out.append(
            {
                "table": tid,
                "row": slug,
                "label": p["label"] if p else res.label,
                "tier": tier,
                "metric": m,
                "paper_metric": fam,
                "reproduced": math.nan if rep is None else rep,
                "published": math.nan if pub is None else pub,
                # a difference only between the same metric: FD_digits − FID means nothing
                "delta": math.nan if rep is None or pub is None or m != fam else rep - pub,
                "comparable": bool(
                    res is not None
                    and res.status == "done"
                    and tier == "paper"
                    and m in PAPER_METRICS
                    and is_real_inception(info.get("extractor"))
                    and isinstance(n, int)
                    and n >= PAPER_N
                ),
                "baseline_row": (res.baseline if res and res.baseline else None)
                or (p["baseline"] if p else None),
                "gain_vs_baseline": math.nan,
                "published_gain": math.nan,
                "extractor": info.get("extractor"),
                "N": n,
                "N_ref": info.get("N_ref"),
                "status": res.status if res else "pending",
                "published_status": p["status"] if p else None,
                "kind": p["kind"] if p else "unpublished",
                "source": p["source"] if p else None,
                "run_dir": res.run_dir if res else None,
                "train_steps": res.train_steps if res else None,
                "config_hash": res.config_hash if res else None,
                "created": res.created if res else None,
            }
        )
    return out


def _add_gains(df, published: Mapping[str, Mapping[str, Any]]):
    rep = {
        (r.table, r.tier, r.row, r.metric): r.reproduced
        for r in df.itertuples(index=False)
        if not math.isnan(r.reproduced)
    }
    pub = {
        (tid, r["row"], m): v
        for tid, doc in published.items()
        for r in doc["rows"]
        for m, v in r["metrics"].items()
    }
    gains, pgains = [], []
    for r in df.itertuples(index=False):
        b = r.baseline_row if isinstance(r.baseline_row, str) else None
        base = rep.get((r.table, r.tier, b, r.metric)) if b else None
        gains.append(r.reproduced - base if base is not None else math.nan)
        pb = pub.get((r.table, b, r.paper_metric)) if b else None
        pgains.append(r.published - pb if pb is not None else math.nan)
    return df.assign(gain_vs_baseline=gains, published_gain=pgains)


def save_aggregate(df, results_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<results_dir>/aggregate.csv`` and ``aggregate.parquet`` (atomically)."""
    import io

    base = Path(results_dir)
    csv_path, pq_path = base / "aggregate.csv", base / "aggregate.parquet"
    atomic_write_bytes(csv_path, df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(pq_path, buf.getvalue())
    return csv_path, pq_path
