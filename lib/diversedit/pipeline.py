"""One table row end to end: train (or reuse) → sample → evaluate → results file.

Every table notebook in ``notebooks/`` calls :func:`run_row` with the flat parameters of one row
file ``params/<notebook stem>/<tier>/<row>.yaml`` (what papermill injects) and displays
:func:`comparison_table`; the CKA figure notebook calls :func:`run_cka` and :func:`cka_figure`.
Runs are keyed by their config hash, so a row shared by several tables trains once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from .config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from pandas.io.formats.style import Styler

    from .generate import SamplingConfig

TIERS = ("smoke", "mini", "paper")
EXTRACTORS = ("inception", "digits-cnn")


@dataclass(frozen=True)
class RowParams:
    """The flat parameters of one table row (a notebook's ``parameters`` cell)."""

    table: str  # table id of params/published (t01 … t07, f01)
    row: str  # row slug in that table
    train: str  # training params file the row starts from (params/train/*.yaml)
    tier: str = "smoke"  # smoke (CPU, digits) | mini (one GPU) | paper (the paper's settings)
    label: str = ""  # display name, e.g. "REPA-B + Ours"
    overrides: str = ""  # dotted training overrides: "model.long_skip=true; optim.max_steps=100"
    sampler: str = "sde"  # sde | ode | ode_heun | meanflow
    sampler_steps: int = 250
    cfg_scale: float = 1.0
    guidance_high: float = 1.0
    num_samples: int = 50_000
    sample_batch: int = 64
    seed: int = 0
    extractor: str = "inception"  # inception (FID …) | digits-cnn (FD_digits …, CPU tier)
    reference: str = ""  # ADM reference .npz, or "digits" for the digits images
    inception_weights: str = ""  # local Inception weights file ("" = env var / hub cache)
    vae: str = "stabilityai/sd-vae-ft-mse"  # decoder for latent runs: local dir or hub id
    results_dir: str = "results"

    def __post_init__(self) -> None:
        checks = {
            "tier": (self.tier in TIERS, f"one of {TIERS}"),
            "extractor": (self.extractor in EXTRACTORS, f"one of {EXTRACTORS}"),
            "reference": (bool(self.reference), 'an ADM reference .npz or "digits"'),
        }
        for key, (ok, need) in checks.items():
            if not ok:
                raise ConfigError(key, f"invalid value {getattr(self, key)!r} (need {need})")
        self.sampling()  # the sampler settings, checked where they are used

    def training_overrides(self) -> dict[str, str]:
        """``overrides`` as a mapping, plus this row's results directory."""
        return parse_overrides(self.overrides, self.results_dir)

    def run_config(self, check_paths: bool = True) -> RunConfig:
        return load_config(self.train, self.training_overrides(), check_paths=check_paths)

    def sampling(self) -> SamplingConfig:
        """The row's :class:`~.generate.SamplingConfig`; a bad setting names the row's key."""
        from .generate import SamplingConfig

        try:
            return SamplingConfig(
                mode=self.sampler,
                num_steps=self.sampler_steps,
                cfg_scale=self.cfg_scale,
                guidance_high=self.guidance_high,
                num_samples=self.num_samples,
                batch_size=self.sample_batch,
                seed=self.seed,
                vae=self.vae,
            )
        except ConfigError as err:
            raise ConfigError(SAMPLING_KEYS.get(err.key, err.key), err.detail) from None

    def preflight(self) -> RunConfig:
        """Everything the row reads before it computes anything: the training configuration
        with its data and weights paths, the reference batch and the Inception weights (a
        :class:`ConfigError` naming the row's key otherwise). Returns the run configuration."""
        cfg = self.run_config()
        if self.reference != "digits" and not Path(self.reference).is_file():
            raise ConfigError(
                "reference", f"{self.reference} does not exist (an ADM reference batch .npz, "
                'e.g. VIRTUAL_imagenet256_labeled.npz, or "digits")',
            )  # fmt: skip
        if self.extractor == "inception":
            from .metrics.extractors import resolve_inception_weights

            try:
                resolve_inception_weights(self.inception_weights or None)
            except FileNotFoundError as err:
                raise ConfigError("inception_weights", str(err)) from None
        return cfg

    def row_dir(self) -> Path:
        return Path(self.results_dir) / self.table / self.tier / self.row


ROW_PARAMETERS = tuple(f.name for f in fields(RowParams))  # a table notebook's parameters
SAMPLING_KEYS = {"mode": "sampler", "num_steps": "sampler_steps", "batch_size": "sample_batch"}


def load_row(path: str | Path, **overrides: Any) -> RowParams:
    """Read a row params file, failing with the file and key on unknown or bad entries."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return row_params(data | overrides, source=str(path))


def row_params(data: dict[str, Any], source: str = "<parameters>") -> RowParams:
    """Build :class:`RowParams` from flat values (papermill may pass numbers as strings)."""
    return _flat_params(RowParams, data, source)


_P = TypeVar("_P")


def _flat_params(cls: type[_P], data: Mapping[str, Any], source: str) -> _P:
    """``cls(**data)`` for a flat dataclass, converting int/float fields given as strings."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            unknown[0], f"unknown {cls.__name__} parameter; known: {sorted(known)}", source
        )
    values = {}
    for key, value in data.items():
        kind = known[key].type
        try:
            values[key] = {"int": int, "float": float}.get(kind, lambda v: v)(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected {kind}, got {value!r}", source) from None
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError("row", str(err), source) from None
    except ConfigError as err:
        raise err.located(source) from None


def parse_overrides(text: str, results_dir: str) -> dict[str, str]:
    """``"a.b=1; c=x"`` → ``{"results_dir": results_dir, "a.b": "1", "c": "x"}``."""
    out = {"results_dir": results_dir}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("overrides", f"expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _reference(params: RowParams, cfg: RunConfig) -> Path:
    """The reference batch: a given .npz, or the digits images at the run's resolution."""
    if params.reference != "digits":
        return Path(params.reference)
    from .metrics.evaluate import digits_reference

    return digits_reference(cfg.data.image_size, Path(params.results_dir) / "reference")


def run_row(params: RowParams) -> dict[str, Any]:
    """Train (resuming or reusing a finished run), sample, evaluate; write the row's results.

    A run that stops on a non-finite loss gives a ``diverged`` result (no samples, no metrics).
    Returns the results record; ``results/<table>/<tier>/<row>/metrics.json`` is written last,
    so a row is done exactly when that file exists.
    """
    import torch

    from .generate import sample_run
    from .metrics.evaluate import evaluate
    from .results import RowResult, write_result
    from .train import NonFiniteLossError, train

    cfg = params.preflight()
    common = dict(
        table=params.table,
        row=params.row,
        tier=params.tier,
        label=params.label or params.row,
        config_hash=cfg.hash(),
        train_steps=cfg.optim.max_steps,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    try:
        run_dir = train(cfg)
    except NonFiniteLossError as err:  # a result too (the paper reports rows that diverge)
        result = RowResult(
            metrics={},
            metric_info={"error": str(err), "step": err.step},
            run_dir=str(cfg.run_dir()),
            status="diverged",
            **common,
        )
        write_result(result, params.results_dir)
        return dataclasses.asdict(result)
    sampling = params.sampling()
    torch._dynamo.reset()  # a fresh graph budget (8 per function) for the sampling network
    samples = sample_run(run_dir, sampling, progress=False)
    row_dir = params.row_dir()
    record = evaluate(
        _reference(params, cfg),
        samples,
        extractor=params.extractor,
        inception_weights=params.inception_weights or None,
        out=row_dir / "evaluation.json",
    )
    metrics = {k: v for k, v in record["metrics"].items() if isinstance(v, float)}
    result = RowResult(
        metrics=metrics,
        metric_info={
            "N_samples": record["metrics"]["N_samples"],
            "N_ref": record["metrics"]["N_ref"],
            "extractor": record["metrics"]["extractor"],
            "sampler": dataclasses.asdict(sampling),
            "paper_comparable": record["protocol"]["paper_comparable"],
        },
        run_dir=str(run_dir),
        status="done",
        **common,
    )
    write_result(result, params.results_dir)
    return dataclasses.asdict(result)


def comparison_table(params: RowParams) -> Styler:
    """The row's table at its tier: reproduced beside published numbers, pending rows greyed."""
    from .report import styled_table
    from .results import aggregate, table_id

    return styled_table(aggregate(params.results_dir), table_id(params.table), params.tier)


# --------------------------------------------------------------------------- CKA figure (f01)

CKA_RUNS = ("sit", "repa", "diversedit")
CKA_METRIC = "mean_offdiag_CKA"  # mean over block pairs i != j of the last snapshot


@dataclass(frozen=True)
class CkaParams:
    """The flat parameters of the CKA figure notebook: three runs, each a train file + overrides."""

    sit: str  # training params file of the SiT run
    repa: str  # … of the REPA run
    diversedit: str  # … of the DiverseDiT run
    sit_overrides: str = ""  # dotted overrides, as RowParams.overrides
    repa_overrides: str = ""
    diversedit_overrides: str = ""
    table: str = "f01"
    row: str = "cka"
    tier: str = "smoke"
    label: str = "Inter-block CKA: SiT vs REPA vs DiverseDiT"
    results_dir: str = "results"

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ConfigError("tier", f"invalid value {self.tier!r}")

    def run_configs(self, check_paths: bool = True) -> dict[str, RunConfig]:
        """The three runs' configurations; each must take CKA snapshots (logging.cka_every)."""
        out = {}
        for name in CKA_RUNS:
            key = f"{name}_overrides"
            overrides = parse_overrides(getattr(self, key), self.results_dir)
            try:
                cfg = load_config(getattr(self, name), overrides, check_paths=check_paths)
            except ConfigError as err:
                raise ConfigError(f"{name}: {err.key}", err.detail, err.source) from None
            if cfg.logging.cka_every <= 0:
                raise ConfigError(key, f"{name}: logging.cka_every must be > 0 for CKA snapshots")
            out[name] = cfg
        return out

    def run_dirs(self) -> dict[str, Path]:
        return {name: cfg.run_dir() for name, cfg in self.run_configs(check_paths=False).items()}


CKA_PARAMETERS = tuple(f.name for f in fields(CkaParams))  # the CKA notebook's parameters


def cka_params(data: dict[str, Any], source: str = "<parameters>") -> CkaParams:
    """Build :class:`CkaParams` from flat values."""
    return _flat_params(CkaParams, data, source)


def mean_offdiag(matrix: Any) -> float:
    """Mean of the off-diagonal entries of an (L, L) matrix (NaN entries ignored)."""
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    values = m[~np.eye(m.shape[0], dtype=bool)]
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def run_cka(params: CkaParams) -> dict[str, Any]:
    """Train (or reuse) the three runs; write the mean off-diagonal CKA of each run's last
    snapshot as ``mean_offdiag_CKA_<run>`` to ``<results>/<table>/<tier>/<row>/metrics.json``."""
    from .report import load_cka
    from .results import RowResult, write_result
    from .train import train

    configs = params.run_configs()
    metrics, runs = {}, {}
    for name, cfg in configs.items():
        run_dir = train(cfg)
        snapshots = load_cka(run_dir)
        if not snapshots:
            raise RuntimeError(f"{run_dir}: no CKA snapshots (cka/step_*.npy)")
        step, matrix = snapshots[-1]
        metrics[f"{CKA_METRIC}_{name}"] = mean_offdiag(matrix)
        runs[name] = {"run_dir": str(run_dir), "config_hash": cfg.hash(), "step": step}
    probe = min(cfg.logging.cka_probe_size for cfg in configs.values())
    steps = {cfg.optim.max_steps for cfg in configs.values()}
    result = RowResult(
        table=params.table,
        row=params.row,
        tier=params.tier,
        label=params.label,
        metrics=metrics,
        metric_info={
            "N_samples": probe,
            "N_ref": probe,
            "extractor": "linear CKA (unbiased HSIC_1) of block outputs on a fixed probe batch",
            "sampler": {"mode": "none"},
            "runs": runs,
        },
        train_steps=steps.pop() if len(steps) == 1 else None,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_result(result, params.results_dir)
    return dataclasses.asdict(result)


def cka_figure(run_dirs: Mapping[str, str | Path], max_steps: int = 12) -> go.Figure:
    """Block × block CKA heatmaps, one panel per run, with a slider over the training steps."""
    from plotly.subplots import make_subplots

    from .report import cka_heatmap, load_cka

    snaps = {name: load_cka(d) for name, d in run_dirs.items()}
    empty = [name for name, s in snaps.items() if not s]
    if empty:
        raise ValueError(f"no CKA snapshots for {empty}")
    all_steps = sorted({step for s in snaps.values() for step, _ in s})
    picks = sorted(
        {round(i * (len(all_steps) - 1) / max(max_steps - 1, 1)) for i in range(max_steps)}
    )
    steps = [all_steps[i] for i in picks if i < len(all_steps)]
    fig = make_subplots(rows=1, cols=len(snaps), subplot_titles=list(snaps))
    for k, step in enumerate(steps):
        for col, series in enumerate(snaps.values(), start=1):
            at, mat = max(
                (s for s in series if s[0] <= step), default=series[0], key=lambda s: s[0]
            )
            fig.add_trace(
                cka_heatmap(
                    mat, showscale=col == 1, visible=k == len(steps) - 1, name=f"step {at}"
                ),
                row=1,
                col=col,
            )
    n = len(snaps)
    slider = [
        {
            "label": str(step),
            "method": "update",
            "args": [{"visible": [t // n == k for t in range(n * len(steps))]}],
        }
        for k, step in enumerate(steps)
    ]
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="block", col=1)
    fig.update_xaxes(title_text="block")
    fig.update_layout(
        title="Inter-block linear CKA during training",
        height=420,
        width=360 * n,
        sliders=[{"active": len(steps) - 1, "currentvalue": {"prefix": "step "}, "steps": slider}],
    )
    return fig
