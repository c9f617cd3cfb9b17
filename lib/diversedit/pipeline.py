"""One table row end to end: train (or reuse) → sample → evaluate → results file.

Every notebook in ``notebooks/`` calls :func:`run_row` with the flat parameters of one row file
``params/<table>/<tier>/<row>.yaml`` (what papermill injects). Runs are keyed by their config
hash, so a row shared by several tables trains once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, load_config

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
            "tier": self.tier in TIERS,
            "extractor": self.extractor in EXTRACTORS,
            "reference": bool(self.reference),
            "num_samples": self.num_samples >= 1,
            "sample_batch": self.sample_batch >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(bad[0], f"invalid value {getattr(self, bad[0])!r}")

    def training_overrides(self) -> dict[str, str]:
        """``overrides`` as a mapping, plus this row's results directory."""
        out = {"results_dir": self.results_dir}
        for item in filter(None, (part.strip() for part in self.overrides.split(";"))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError("overrides", f"expected key=value, got {item!r}")
            out[key.strip()] = value.strip()
        return out

    def run_config(self, check_paths: bool = True) -> RunConfig:
        return load_config(self.train, self.training_overrides(), check_paths=check_paths)

    def row_dir(self) -> Path:
        return Path(self.results_dir) / self.table / self.tier / self.row


def load_row(path: str | Path, **overrides: Any) -> RowParams:
    """Read a row params file, failing with the file and key on unknown or bad entries."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return row_params(data | overrides, source=str(path))


def row_params(data: dict[str, Any], source: str = "<parameters>") -> RowParams:
    """Build :class:`RowParams` from flat values (papermill may pass numbers as strings)."""
    known = {f.name: f for f in fields(RowParams)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(unknown[0], f"unknown row parameter; known: {sorted(known)}", source)
    values = {}
    for key, value in data.items():
        kind = known[key].type
        try:
            values[key] = {"int": int, "float": float}.get(kind, lambda v: v)(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected {kind}, got {value!r}", source) from None
    try:
        return RowParams(**values)
    except TypeError as err:
        raise ConfigError("row", str(err), source) from None
    except ConfigError as err:
        raise err.located(source) from None


def _reference(params: RowParams, cfg: RunConfig) -> Path:
    """The reference batch: a given .npz, or the digits images at the run's resolution."""
    if params.reference != "digits":
        return Path(params.reference)
    from .data.digits import digits_images
    from .metrics.evaluate import save_adm_npz

    path = Path(params.results_dir) / "reference" / f"digits_{cfg.data.image_size}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adm_npz(path, digits_images("all", cfg.data.image_size)[0])
    return path


def run_row(params: RowParams) -> dict[str, Any]:
    """Train (resuming or reusing a finished run), sample, evaluate; write the row's results.

    Returns the results record; ``results/<table>/<tier>/<row>/metrics.json`` is written last,
    so a row is done exactly when that file exists.
    """
    from .generate import SamplingConfig, sample_run
    from .metrics.evaluate import evaluate
    from .results import RowResult, write_result
    from .train import train

    cfg = params.run_config()
    run_dir = train(cfg)
    sampling = SamplingConfig(
        mode=params.sampler,
        num_steps=params.sampler_steps,
        cfg_scale=params.cfg_scale,
        guidance_high=params.guidance_high,
        num_samples=params.num_samples,
        batch_size=params.sample_batch,
        seed=params.seed,
        vae=params.vae,
    )
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
        table=params.table,
        row=params.row,
        tier=params.tier,
        label=params.label or params.row,
        metrics=metrics,
        metric_info={
            "N_samples": record["metrics"]["N_samples"],
            "N_ref": record["metrics"]["N_ref"],
            "extractor": record["metrics"]["extractor"],
            "sampler": dataclasses.asdict(sampling),
            "paper_comparable": record["protocol"]["paper_comparable"],
        },
        run_dir=str(run_dir),
        config_hash=cfg.hash(),
        train_steps=cfg.optim.max_steps,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        status="done",
    )
    write_result(result, params.results_dir)
    return dataclasses.asdict(result)
