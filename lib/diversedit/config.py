"""Typed run configuration: one YAML file per training run, checked before any work starts.

``load_config("params/train/x.yaml", {"optim.lr": "2e-4"})`` reads the file, applies dotted
overrides (papermill / CLI style), converts and checks every value and returns a frozen
:class:`RunConfig`. Every problem raises :class:`ConfigError` naming the file and the dotted key,
e.g. ``params/x.yaml: optim.lr: expected a number, got 'fast'``. Nothing is computed or written.

Numbers written as strings are accepted for numeric fields: PyYAML (YAML 1.1) loads ``1e-4`` as
the string ``'1e-4'`` (notebook-conventions §1.2), and a bare ``no`` as ``false`` (accepted for
``precision.mixed_precision``). Model fields that follow from other sections (REPA projector
width and depth, MeanFlow's interval embedding, SRA's student head, the data's input shape) are
derived by :meth:`RunConfig.model_config`; restating them is allowed only with the same value.

``to_dict()`` is fully resolved, so ``config_from_dict(cfg.to_dict()) == cfg`` and
``load_config(cfg.to_dict())`` round-trip. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import numbers
import os
import re
import types
from collections.abc import Callable, Hashable, Mapping
from dataclasses import MISSING, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from .losses.diversity import DiversityConfig, check_triton_supported, select_pairs
from .losses.objective import ObjectiveConfig
from .models.sit import (
    CONCAT_ORDERS,
    FUSION_DTYPES,
    SKIP_INITS,
    SKIP_NORMS,
    SiTConfig,
)
from .models.sit import model_config as registry_config
from .triton_support import compile_default_on, triton_default_on

DIGITS_CNN_DIM = 64  # feature width of the digits-cnn encoder (REPA target on the digits data)
ENCODER_DIMS = {
    "dinov2-vit-s": 384,
    "dinov2-vit-b": 768,
    "dinov2-vit-l": 1024,
    "digits-cnn": DIGITS_CNN_DIM,
}
ENCODERS = ("none", *ENCODER_DIMS)
DINOV2_WEIGHTS = {  # official checkpoint file names
    "dinov2-vit-s": "dinov2_vits14_pretrain.pth",
    "dinov2-vit-b": "dinov2_vitb14_pretrain.pth",
    "dinov2-vit-l": "dinov2_vitl14_pretrain.pth",
}
DATA_KINDS = ("imagenet_latents", "digits")
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("model", "blocks")
UPDATES = ("library", "compiled", "triton")  # precision.update: how clip, AdamW and EMA run
LATENT_DOWNSAMPLE, LATENT_CHANNELS, IMAGENET_CLASSES = 8, 4, 1000
DIGITS_SIZE, DIGITS_CLASSES = 8, 10
DINOV2_PATCH_PIXELS = 16  # REPA feeds 224·(res/256) px to a /14 ViT: res/16 tokens per side
CUSTOM_REQUIRED = ("depth", "hidden_size", "num_heads")
# Keys of to_dict() left out of hash(): they do not change what is trained. model.name is
# redundant with the resolved architecture fields, which are hashed.
HASH_EXCLUDED = (
    "name",
    "results_dir",
    "logging",
    "checkpoint",
    "data.num_workers",
    "model.name",
    "precision.compile",  # how the same mathematics is executed
    "precision.compile_mode",
    "precision.compile_scope",
    "precision.diversity_triton",
    "precision.update",
)
_SLUG = re.compile(r"[a-z0-9._-]+")
_MODEL_CHOICES = {
    "long_skip_concat_order": CONCAT_ORDERS,
    "long_skip_norm": SKIP_NORMS,
    "long_skip_init": SKIP_INITS,
    "fusion_output_dtype": FUSION_DTYPES,
}
_MODEL_POSITIVE = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "num_classes",
    "projector_dim",
)


class ConfigError(ValueError):
    """An invalid run configuration; ``str()`` is ``"<source>: <dotted key>: <problem>"``."""

    def __init__(self, key: str, detail: str, source: str | None = None) -> None:
        super().__init__(key, detail, source)
        self.key, self.detail, self.source = key, detail, source

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.key, self.detail) if part)

    def nested(self, prefix: str) -> ConfigError:
        return ConfigError(_join(prefix, self.key), self.detail, self.source)

    def located(self, source: str) -> ConfigError:
        return ConfigError(self.key, self.detail, source)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """``model:`` a registry name (``SiT-B/2`` …, or ``custom``) plus explicit SiTConfig fields.

    ``overrides`` holds only the fields that differ from what the name and the other sections
    give; :meth:`RunConfig.model_config` resolves the full :class:`SiTConfig`.
    """

    name: str = "SiT-B/2"
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.name != "custom":
            try:
                registry_config(self.name)
            except ValueError as err:
                raise ConfigError("name", str(err)) from None
        known = {f.name for f in dataclasses.fields(SiTConfig)}
        for key in self.overrides:
            _check(key in known, key, "not a SiTConfig field")
        object.__setattr__(self, "overrides", dict(self.overrides))


@dataclass(frozen=True)
class EncoderConfig:
    """``encoder:`` the frozen external encoder REPA aligns to (``none``: no encoder)."""

    name: str = "none"
    weights: str | None = None  # local checkpoint file; required for dinov2-*
    resolution: int | None = None  # pixels the encoder sees; None = data.image_size

    def __post_init__(self) -> None:
        _check(self.name in ENCODERS, "name", _not_one_of(self.name, ENCODERS))
        if self.resolution is not None:
            _at_least(self, "resolution", 1)

    @property
    def dim(self) -> int | None:
        """Feature width of the encoder's patch tokens (None for ``none``)."""
        return ENCODER_DIMS.get(self.name)


@dataclass(frozen=True)
class DataConfig:
    """``data:`` prepared ImageNet VAE latents, or 8×8 digits upsampled to ``image_size``."""

    kind: str = "imagenet_latents"
    path: str | None = None  # imagenet_latents: the folder holding images/ and vae-sd/
    image_size: int | None = None  # pixels; None = 256 (imagenet_latents) or 8 (digits)
    channels: int | None = None  # channels the model sees; None = 4 (latents) or 1 (digits)
    latent_scale: float = 0.18215
    num_workers: int = 4

    def __post_init__(self) -> None:
        _check(self.kind in DATA_KINDS, "kind", _not_one_of(self.kind, DATA_KINDS))
        latents = self.kind == "imagenet_latents"
        size = self.image_size if self.image_size is not None else 256 if latents else DIGITS_SIZE
        channels = self.channels if self.channels is not None else 4 if latents else 1
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "channels", channels)
        if latents:
            _check(
                size >= LATENT_DOWNSAMPLE and size % LATENT_DOWNSAMPLE == 0,
                "image_size",
                f"must be a multiple of {LATENT_DOWNSAMPLE} (the VAE downsampling), got {size}",
            )
            _check(
                channels == LATENT_CHANNELS,
                "channels",
                f"SD-VAE latents have {LATENT_CHANNELS} channels, got {channels}",
            )
        else:
            _check(
                size >= DIGITS_SIZE,
                "image_size",
                f"digits are {DIGITS_SIZE}×{DIGITS_SIZE} and are upsampled to image_size "
                f"(>= {DIGITS_SIZE}), got {size}",
            )
            _at_least(self, "channels", 1)
        _above(self, "latent_scale", 0)
        _at_least(self, "num_workers", 0)


@dataclass(frozen=True)
class OptimConfig:
    """``optim:`` AdamW, EMA and the step budget (defaults: REPA / DiverseDiT release).

    ``global_batch`` must split over ``grad_accum``; its split over processes is the trainer's
    check (the process count is not part of the configuration).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    ema_decay: float = 0.9999
    global_batch: int = 256  # over all processes and accumulation steps
    grad_accum: int = 1
    max_steps: int = 400_000

    def __post_init__(self) -> None:
        betas = tuple(self.betas)
        object.__setattr__(self, "betas", betas)
        _above(self, "lr", 0)
        _check(len(betas) == 2, "betas", f"expected 2 numbers, got {len(betas)}")
        _check(all(0 <= b < 1 for b in betas), "betas", f"must lie in [0, 1), got {list(betas)}")
        _at_least(self, "weight_decay", 0)
        _above(self, "eps", 0)
        _at_least(self, "grad_clip", 0, " (0 = off)")
        _check(0 <= self.ema_decay <= 1, "ema_decay", f"must be in [0, 1], got {self.ema_decay}")
        _at_least(self, "global_batch", 1)
        _at_least(self, "grad_accum", 1)
        _check(
            self.global_batch % self.grad_accum == 0,
            "global_batch",
            f"{self.global_batch} is not divisible by optim.grad_accum ({self.grad_accum})",
        )
        _at_least(self, "max_steps", 1)


@dataclass(frozen=True)
class PrecisionConfig:
    """``precision:`` autocast dtype (release default fp16), TF32 and ``torch.compile``.

    ``compile`` compiles the model and the diversity loss; ``null`` (default) = on for CUDA
    devices that Inductor's Triton kernels support (compute capability 7.0+), off on CPU (where
    compiling costs more than it saves for short runs).
    ``compile_mode`` is ``torch.compile``'s mode for the model; ``compile_scope`` compiles the
    whole ``model`` as one graph or each transformer ``blocks`` alone (regional compilation: the
    blocks share one compiled graph, so compiling takes seconds instead of a minute).
    ``diversity_triton`` computes the diversity statistics with the Triton kernels of
    :mod:`~diversedit.losses.diversity_triton`; ``null`` (default) = on for CUDA devices of
    compute capability 8.0+ with Triton, in bf16 or no mixed precision, when the diversity
    options are ones the kernels implement (XL/2 loss 4.2 → 3.3 ms on an H200), off elsewhere
    (also in fp16, whose kernels have not yet run on a GPU).
    ``update`` runs gradient clipping, AdamW and the EMA as the ``library`` does (three steps,
    four passes over the parameters), or fused into two passes (:class:`~diversedit.update.
    FusedUpdate`, same mathematics): ``compiled`` by ``torch.compile`` (minutes to compile at
    XL/2) or ``triton`` kernels (CUDA; seconds). Fused updates need bf16 or no mixed precision,
    since fp16's gradient scaler decides on the host whether to skip a step; ``null``
    (default) = ``triton`` on CUDA devices of compute capability 8.0+ with Triton, in bf16 or
    no mixed precision (XL/2 update 10.5 → 7.6 ms on an H200), ``library`` otherwise.
    None of these six enters the run hash.
    """

    mixed_precision: str = field(default="fp16", metadata={"choices": MIXED_PRECISION})
    allow_tf32: bool = True
    compile: bool | None = None
    compile_mode: str = field(default="default", metadata={"choices": COMPILE_MODES})
    compile_scope: str = field(default="model", metadata={"choices": COMPILE_SCOPES})
    diversity_triton: bool | None = None
    update: str | None = field(default=None, metadata={"choices": UPDATES})

    def compile_on(self, device: torch.device) -> bool:
        """Whether to compile on ``device`` (resolves the ``null`` default)."""
        if self.compile is not None:
            return self.compile
        return compile_default_on(device)

    def diversity_triton_on(self, device: torch.device, diversity: DiversityConfig | None) -> bool:
        """Whether the diversity statistics run as Triton kernels (resolves ``null``)."""
        if self.diversity_triton is not None:
            return self.diversity_triton
        if diversity is None or self.mixed_precision == "fp16" or not triton_default_on(device):
            return False  # fp16 blocks: tested in Triton's interpreter, not yet on a GPU
        try:
            check_triton_supported(diversity)
        except ValueError:
            return False
        return True

    def update_on(self, device: torch.device) -> str:
        """How the parameter update runs on ``device`` (resolves ``null``)."""
        if self.update is not None:
            return self.update
        fused = triton_default_on(device) and self.mixed_precision != "fp16"
        return "triton" if fused else "library"

    def __post_init__(self) -> None:
        _check(
            self.mixed_precision in MIXED_PRECISION,
            "mixed_precision",
            _not_one_of(self.mixed_precision, MIXED_PRECISION),
        )
        _check(
            self.compile_mode in COMPILE_MODES,
            "compile_mode",
            _not_one_of(self.compile_mode, COMPILE_MODES),
        )
        _check(
            self.compile_scope in COMPILE_SCOPES,
            "compile_scope",
            _not_one_of(self.compile_scope, COMPILE_SCOPES),
        )
        _check(
            self.update is None or self.update in UPDATES,
            "update",
            _not_one_of(self.update, UPDATES),
        )
        _check(
            self.update in (None, "library") or self.mixed_precision != "fp16",
            "update",
            f"{self.update!r} needs mixed_precision bf16 or no: with fp16 the gradient scaler "
            "decides on the host whether to skip each step",
        )


@dataclass(frozen=True)
class LoggingConfig:
    """``logging:`` scalar logging period and the in-training CKA probe (0 = off)."""

    log_every: int = 100
    cka_every: int = 0
    cka_probe_size: int = 16
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _at_least(self, "log_every", 1)
        _at_least(self, "cka_every", 0, " (0 = off)")
        _at_least(self, "cka_probe_size", 2, " (CKA compares samples)")


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint:`` save period in steps and how many checkpoints to keep. ``continue_shorter``:
    a run (re)starts from the newest checkpoint within its budget, its own or one of a run whose
    configuration differs only in ``optim.max_steps`` — the same trajectory, since nothing
    depends on the budget (e.g. Table 2's 200 epochs continue the 80-epoch run)."""

    every: int = 5000
    keep_last: int = 3
    continue_shorter: bool = True

    def __post_init__(self) -> None:
        _at_least(self, "every", 1)
        _at_least(self, "keep_last", 1)


@dataclass(frozen=True)
class RunConfig:
    """A whole training run; construction checks every cross-section constraint."""

    name: str = field(metadata={"help": "a slug of [a-z0-9._-] such as 'sit-b2-diversedit'"})
    seed: int = 0
    results_dir: str = "results"
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and _SLUG.fullmatch(self.name) is not None,
            "name",
            f"expected a slug of [a-z0-9._-], got {_show(self.name)}",
        )
        _at_least(self, "seed", 0)
        _check(bool(self.results_dir), "results_dir", "must not be empty")
        self._check_encoder()
        model = self.model_config()
        self._check_objective(model.depth)
        # Keep only the model fields that the name and the other sections do not give already,
        # so equal configurations compare equal however they were written.
        locked, base = self._locked_model_fields(), _sit_defaults()
        keep = {
            k: v
            for k, v in self.model.overrides.items()
            if k not in locked
            and (v != base[k] or (self.model.name == "custom" and k in CUSTOM_REQUIRED))
        }
        object.__setattr__(self, "model", ModelSection(self.model.name, keep))

    @property
    def repa_on(self) -> bool:
        """True when the REPA term is configured with a positive coefficient."""
        return self.objective.repa is not None and self.objective.repa.coeff > 0

    @property
    def sra_on(self) -> bool:
        """True when the SRA term is configured with a positive coefficient."""
        return self.objective.sra is not None and self.objective.sra.coeff > 0

    def model_config(self) -> SiTConfig:
        """The network: ``model`` fields plus those derived from the data, encoder and objective.

        Derived: ``z_dims`` (the encoder width when REPA is on, else ``()``), ``encoder_depth``
        (``objective.repa.encoder_depth``), ``interval_embedding`` (MeanFlow on),
        ``sra_student_depth`` (``objective.sra.student_depth``, 0 when SRA is off) and
        ``input_size`` / ``in_channels`` / ``num_classes`` from ``data``; a registry name fixes
        depth, width, heads and patch size.
        """
        given, locked = self.model.overrides, self._locked_model_fields()
        if self.model.name == "custom":
            for key in CUSTOM_REQUIRED:
                _check(key in given, f"model.{key}", "required when model.name is 'custom'")
        for key, value in given.items():
            if key in locked and value != locked[key][0]:
                want, source, hint = locked[key]
                raise ConfigError(
                    f"model.{key}",
                    f"{_show(value)} contradicts {source}, which gives {_show(want)}; "
                    + (hint or f"remove model.{key}, it is derived"),
                )
        values = _sit_defaults() | given | {k: v for k, (v, _, _) in locked.items()}
        self._check_model_values(values, locked)
        try:
            return SiTConfig(**values)
        except ValueError as err:
            raise _foreign(SiTConfig, err, "model") from None

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved configuration of plain JSON types (``model`` = the resolved SiTConfig)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model":
                value = {"name": self.model.name, **dataclasses.asdict(self.model_config())}
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = _plain(value)
        return out

    def hash(self) -> str:
        """First 10 hex digits of the sha256 of the canonical JSON of ``to_dict()`` without the
        keys of :data:`HASH_EXCLUDED` (naming, output places, logging, checkpoints, workers,
        compilation)."""
        text = json.dumps(
            hashed_part(self.to_dict()), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def run_dir(self) -> Path:
        """``results_dir/runs/<name>-<hash>``: where this run's files go (not created here)."""
        return Path(self.results_dir) / "runs" / f"{self.name}-{self.hash()}"

    def check_paths(self) -> None:
        """Check the files the run reads: the encoder weights load into the encoder (compared on
        the meta device) and the prepared ImageNet folder pairs every image with its latents;
        and that one global batch fits the data set and splits over the processes
        (``WORLD_SIZE``, as set by torchrun, accelerate and ``train.sbatch``)."""
        from .encoders import check_weights

        enc, data, opt = self.encoder, self.data, self.optim
        world = int(os.environ.get("WORLD_SIZE") or 1)
        _check(
            opt.global_batch % (world * opt.grad_accum) == 0,
            "optim.global_batch",
            f"{opt.global_batch} is not divisible by {world} processes (WORLD_SIZE) × "
            f"{opt.grad_accum} accumulation steps (optim.grad_accum)",
        )
        if enc.weights is not None:
            fetch = (
                f"; download {DINOV2_WEIGHTS[enc.name]} and set encoder.weights to its path"
                if enc.name in DINOV2_WEIGHTS
                else ""
            )
            _check(
                Path(enc.weights).is_file(),
                "encoder.weights",
                f"{enc.weights!r} is not an existing file{fetch}",
            )
            _checked("encoder.weights", check_weights, enc.name, enc.weights)
        if data.kind != "imagenet_latents":
            from .data.digits import dataset_size

            self._check_batch_fits(dataset_size(), "the digits data set")
            return
        how = "run `diversedit prepare` first"
        _check(
            data.path is not None,
            "data.path",
            f"required for data.kind imagenet_latents: the folder with images/ and vae-sd/ ({how})",
        )
        root = Path(data.path)
        _check(
            root.is_dir(),
            "data.path",
            f"{data.path!r} does not exist; point it at the prepared ImageNet folder holding "
            f"images/ and vae-sd/ ({how})",
        )
        for sub, what in (
            ("images", f"the {data.image_size}-px images and dataset.json"),
            ("vae-sd", "the VAE latents (one .npy of posterior mean and std per image)"),
        ):
            _check(
                (root / sub).is_dir(),
                "data.path",
                f"{data.path!r} has no {sub}/ folder; put {what} in {root / sub} ({how})",
            )
        stamp = tuple((root / sub).stat().st_mtime_ns for sub in ("images", "vae-sd"))
        size = _checked("data.path", _dataset_pairs, str(root.resolve()), stamp)
        self._check_batch_fits(size, repr(data.path))

    def _check_batch_fits(self, size: int, what: str) -> None:
        batch = self.optim.global_batch
        _check(
            batch <= size,
            "optim.global_batch",
            f"{batch} is more than the {size:,} images of {what}: one batch must fit",
        )

    # ------------------------------------------------------------------ internal checks

    def _check_encoder(self) -> None:
        enc, data = self.encoder, self.data
        if enc.resolution is None:
            object.__setattr__(
                self, "encoder", dataclasses.replace(enc, resolution=data.image_size)
            )
        else:
            _check(
                enc.resolution == data.image_size,
                "encoder.resolution",
                f"{enc.resolution} contradicts data.image_size ({data.image_size}): the encoder "
                "sees the training images; leave encoder.resolution out",
            )
        if enc.name == "none":
            _check(enc.weights is None, "encoder.weights", "set but encoder.name is 'none'")
            if self.repa_on:
                raise ConfigError(
                    "objective.repa",
                    f"REPA (coeff {self.objective.repa.coeff}) needs an external encoder but "
                    f"encoder.name is 'none'; set encoder.name to one of {list(ENCODER_DIMS)} "
                    "or objective.repa to null",
                )
        elif enc.name == "digits-cnn":
            _check(
                data.kind == "digits",
                "encoder.name",
                f"digits-cnn encodes digits images but data.kind is {data.kind!r}",
            )
        else:
            _check(
                data.kind == "imagenet_latents",
                "encoder.name",
                f"{enc.name} encodes ImageNet images but data.kind is {data.kind!r} "
                "(use digits-cnn)",
            )
            _check(
                enc.weights is not None,
                "encoder.weights",
                f"{enc.name} needs local weights: download {DINOV2_WEIGHTS[enc.name]} and set "
                "encoder.weights to its path",
            )

    def _locked_model_fields(self) -> dict[str, tuple[Any, str, str]]:
        """Model fields fixed elsewhere: {field: (value, where it comes from, advice)}."""
        leave = ""  # default advice: remove the derived field
        locked: dict[str, tuple[Any, str, str]] = {}
        name = self.model.name
        if name != "custom":
            registry = registry_config(name)
            for key in ("depth", "hidden_size", "num_heads", "patch_size"):
                where = f"model.name ({name!r})"
                locked[key] = (
                    getattr(registry, key),
                    where,
                    "use model.name: custom for other sizes",
                )
        data = self.data
        if data.kind == "digits":
            locked["input_size"] = (data.image_size, "data.image_size", leave)
            locked["in_channels"] = (data.channels, "data.channels", leave)
            locked["num_classes"] = (DIGITS_CLASSES, "data.kind (digits)", leave)
        else:
            where = f"data.image_size ({data.image_size} px, latents /{LATENT_DOWNSAMPLE})"
            locked["input_size"] = (data.image_size // LATENT_DOWNSAMPLE, where, leave)
            locked["in_channels"] = (LATENT_CHANNELS, "data.channels", leave)
            locked["num_classes"] = (IMAGENET_CLASSES, "data.kind (imagenet_latents)", leave)
        obj, default = self.objective, _sit_defaults()
        if self.repa_on:
            locked["z_dims"] = ((ENCODER_DIMS[self.encoder.name],), "encoder.name", leave)
            locked["encoder_depth"] = (
                obj.repa.encoder_depth,
                "objective.repa.encoder_depth",
                leave,
            )
        else:
            locked["z_dims"] = ((), "objective.repa (off)", leave)
            locked["encoder_depth"] = (default["encoder_depth"], "objective.repa (off)", leave)
        locked["interval_embedding"] = (obj.meanflow is not None, "objective.meanflow", leave)
        if self.sra_on:
            student = (obj.sra.student_depth, "objective.sra.student_depth", leave)
        else:
            student = (0, "objective.sra (off)", leave)
        locked["sra_student_depth"] = student
        return locked

    def _check_model_values(self, values: dict[str, Any], locked: Mapping[str, Any]) -> None:
        for key in _MODEL_POSITIVE:
            _check(values[key] >= 1, f"model.{key}", f"must be >= 1, got {values[key]}")
        _check(
            values["mlp_ratio"] > 0, "model.mlp_ratio", f"must be > 0, got {values['mlp_ratio']}"
        )
        for key, choices in _MODEL_CHOICES.items():
            _check(values[key] in choices, f"model.{key}", _not_one_of(values[key], choices))
        hidden, heads, depth = values["hidden_size"], values["num_heads"], values["depth"]
        _check(
            hidden % heads == 0 and hidden % 4 == 0,
            "model.hidden_size",
            f"{hidden} must be divisible by model.num_heads ({heads}) and by 4",
        )
        size, patch = values["input_size"], values["patch_size"]
        origin = f" (from {locked['input_size'][1]})" if "input_size" in locked else ""
        _check(
            size % patch == 0,
            "model.input_size",
            f"{size}{origin} is not divisible by model.patch_size ({patch})",
        )
        obj = self.objective
        if obj.repa is not None:
            e = obj.repa.encoder_depth
            _check(
                e <= depth,
                "objective.repa.encoder_depth",
                f"{e} exceeds model.depth ({depth})",
            )
        if obj.sra is not None:
            for key in ("student_depth", "teacher_depth"):
                value = getattr(obj.sra, key)
                _check(
                    value <= depth,
                    f"objective.sra.{key}",
                    f"{value} exceeds model.depth ({depth})",
                )
        if self.repa_on and self.encoder.name in DINOV2_WEIGHTS:
            side = self.encoder.resolution // DINOV2_PATCH_PIXELS
            _check(
                (size // patch) == side,
                "model.patch_size",
                f"REPA with {self.encoder.name} at {self.encoder.resolution} px gives "
                f"{side}×{side} patch tokens but the model has {size // patch}×{size // patch} "
                f"(input_size {size} / patch_size {patch}); use patch_size {size // side or 1}",
            )

    def _check_objective(self, depth: int) -> None:
        obj = self.objective
        div = obj.diversity
        if div is not None and self.precision.diversity_triton:
            try:
                check_triton_supported(div)
            except ValueError as err:
                raise ConfigError("precision.diversity_triton", str(err)) from None
        if div is not None:
            if div.explicit_pairs and div.pairs != "explicit":
                raise ConfigError(
                    "objective.diversity.explicit_pairs",
                    f"given but pairs is {div.pairs!r}; set pairs: explicit to use them",
                )
            key = "explicit_pairs" if div.pairs == "explicit" else "pair_encoder_depth"
            try:
                pairs = select_pairs(depth, div)
            except ValueError as err:
                raise ConfigError(f"objective.diversity.{key}", f"{err} (depth {depth})") from None
            if not pairs and depth >= 2 and {"orth", "mi"} & set(div.terms):
                m = len(select_pairs(depth, dataclasses.replace(div, pairs="all")))
                raise ConfigError(
                    f"objective.diversity.{key}",
                    f"pairs: release_formula with pair_encoder_depth {div.pair_encoder_depth} "
                    f"selects no block pairs at model.depth {depth}, so the orth and mi terms "
                    f"would be 0; use pair_encoder_depth in {m - depth + 1}..{m + depth - 1} "
                    "or pairs: star",
                )
        disp = obj.dispersive
        if disp is not None:
            _check(
                -depth <= disp.block < depth,
                "objective.dispersive.block",
                f"{disp.block} is outside the blocks of model.depth {depth} "
                f"({-depth}..{depth - 1}, negative counts from the end)",
            )


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    check_paths: bool = True,
) -> RunConfig:
    """Read a params YAML file (or take a mapping, e.g. ``cfg.to_dict()``), apply dotted
    ``overrides`` and return the checked :class:`RunConfig`.

    Override values given as strings are read as YAML scalars / flow collections, as on a
    command line (``"2e-4"``, ``"true"``, ``"null"``, ``"[0.9, 0.95]"``); setting a key under a
    term that is null (``objective.repa.coeff``) switches the term on. ``check_paths`` also
    checks the data folder and encoder weights (:meth:`RunConfig.check_paths`); switch it off
    for dry runs. Raises :class:`ConfigError`; writes nothing.
    """
    if isinstance(path, Mapping):
        source, data = "<dict>", copy.deepcopy(dict(path))
    else:
        source, data = str(path), _read_yaml(Path(path))
    keys = [str(k) for k in overrides or {}]
    try:
        data = _apply_overrides(data, overrides or {})
        cfg = _build(RunConfig, data, "")
        if check_paths:
            cfg.check_paths()
    except ConfigError as err:
        hit = any(
            f"{err.key}.".startswith(f"{k}.") or f"{k}.".startswith(f"{err.key}.") for k in keys
        )
        raise err.located(f"{source} (overrides)" if hit else source) from None
    return cfg


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Build a :class:`RunConfig` from a parsed params mapping; ``source`` prefixes errors.

    Structural checks only: the file system is not looked at (see :meth:`RunConfig.check_paths`).
    """
    try:
        return _build(RunConfig, copy.deepcopy(data), "")
    except ConfigError as err:
        raise err.located(source) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable):
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError("", f"line {line}: key {key!r} appears twice")
            seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    source = str(path)
    try:
        with path.open(encoding="utf-8") as stream:  # the stream name puts the path in YAML errors
            return yaml.load(stream, Loader=_UniqueKeyLoader)
    except OSError as err:
        raise ConfigError("", f"cannot read params file ({err.strerror or err})", source) from None
    except ConfigError as err:
        raise err.located(source) from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"not valid YAML: {err}", source) from None


def _apply_overrides(data: Any, overrides: Mapping[str, Any]) -> Any:
    if overrides and not isinstance(data, dict):
        raise ConfigError("", f"cannot apply overrides: expected a mapping, got {_show(data)}")
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        _check(all(parts), str(dotted), "malformed override key")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif isinstance(child, Mapping):
                child = dict(child)
            else:
                raise ConfigError(
                    ".".join(parts[: i + 1]), f"holds {_show(child)}, so {dotted!r} cannot be set"
                )
            node[part] = child
            node = child
        node[parts[-1]] = _override_value(value)
    return data


def _override_value(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return value if isinstance(parsed, str) else parsed


# --------------------------------------------------------------------------- conversion


def _build(cls: type, value: Any, key: str, defaults: Mapping[str, Any] | None = None) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, converting each value to its field type."""
    data = _mapping(value, key)
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _reject_unknown(data, known, key)
    kwargs = dict(defaults or {})
    for name, raw in data.items():
        f, child = known[name], _join(key, name)
        if raw is False and "no" in f.metadata.get("choices", ()):
            raw = "no"  # YAML 1.1 reads a bare `no` as false
        kwargs[name] = _value(hints[name], raw, child)
    for name, f in known.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            help_ = f" ({f.metadata['help']})" if "help" in f.metadata else ""
            raise ConfigError(_join(key, name), f"required{help_}")
    return _construct(cls, kwargs, key)


def _build_model(value: Any, key: str) -> ModelSection:
    data = _mapping(value, key)
    hints = get_type_hints(SiTConfig)
    _reject_unknown(data, ["name", *hints], key)
    name = _value(str, data.get("name", ModelSection.name), _join(key, "name"))
    fields_ = {k: _value(hints[k], v, _join(key, k)) for k, v in data.items() if k != "name"}
    return _construct(ModelSection, {"name": name, "overrides": fields_}, key)


def _build_objective(value: Any, key: str) -> ObjectiveConfig:
    """Like :func:`_build`, plus the §5.3 default of ``diversity.pair_encoder_depth`` (the REPA
    encoder depth when REPA is on, else 8) and an early MeanFlow compatibility check."""
    data = _mapping(value, key)
    hints = get_type_hints(ObjectiveConfig)
    _reject_unknown(data, hints, key)
    parts = {n: _value(hints[n], v, _join(key, n)) for n, v in data.items() if n != "diversity"}
    if "diversity" in data:
        raw, child = data["diversity"], _join(key, "diversity")
        repa = parts.get("repa")
        depth = repa.encoder_depth if repa is not None and repa.coeff > 0 else 8
        if isinstance(raw, Mapping):
            parts["diversity"] = _build(DiversityConfig, raw, child, {"pair_encoder_depth": depth})
        else:
            parts["diversity"] = _value(hints["diversity"], raw, child)
    if parts.get("meanflow") is not None:
        for other in ("repa", "sra"):
            _check(
                parts.get(other) is None,
                _join(key, "meanflow"),
                f"MeanFlow cannot be combined with {_join(key, other)} (it composes with the "
                f"diversity and dispersive terms only); set {other} to null",
            )
    return _construct(ObjectiveConfig, parts, key)


_BUILDERS = {ModelSection: _build_model, ObjectiveConfig: _build_objective}


def _construct(cls: type, kwargs: dict[str, Any], key: str) -> Any:
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.nested(key) from None
    except (ValueError, TypeError) as err:
        raise _foreign(cls, err, key) from None


def _foreign(cls: type, err: Exception, key: str) -> ConfigError:
    """A ValueError from a component dataclass, keyed by the first field name it mentions."""
    text = str(err)
    cut = text.find(f": {cls.__name__}(")
    text = text[:cut] if cut >= 0 else text
    hits = []
    for f in dataclasses.fields(cls):
        match = re.search(rf"\b{re.escape(f.name)}\b", text)
        if match:
            hits.append((match.start(), f.name))
    return ConfigError(_join(key, min(hits)[1]) if hits else key, text)


def _value(hint: Any, value: Any, key: str, nullable: bool = False) -> Any:
    """Convert ``value`` to the type ``hint`` or raise a ConfigError naming ``key``."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        (inner,) = args
        return _value(inner, value, key, nullable=True)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        _check(isinstance(value, Mapping), key, _mismatch(hint, value, nullable))
        return _BUILDERS[hint](value, key) if hint in _BUILDERS else _build(hint, value, key)
    if hint in (int, float):
        return _number(value, key, hint is int, nullable)
    if hint is bool:
        _check(isinstance(value, bool), key, _mismatch(hint, value, nullable))
        return value
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        _check(isinstance(value, str), key, _mismatch(hint, value, nullable))
        return value
    if get_origin(hint) is tuple:
        args = get_args(hint)
        _check(isinstance(value, (list, tuple)), key, _mismatch(hint, value, nullable))
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        else:
            _check(
                len(value) == len(args),
                key,
                f"expected {_describe(hint)}, got {len(value)} items",
            )
        return tuple(
            _value(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    raise TypeError(f"unsupported field type {hint!r} for {key}")


def _number(value: Any, key: str, integer: bool, nullable: bool) -> int | float:
    x = value
    if isinstance(value, str):  # '1e-4', '0.5', '400_000' (YAML 1.1, papermill -r)
        try:
            x = int(value.strip())
        except ValueError:
            try:
                x = float(value.strip())
            except ValueError:
                x = None
    hint = int if integer else float
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ConfigError(key, _mismatch(hint, value, nullable))
    if isinstance(x, numbers.Integral):
        return int(x) if integer else float(x)
    x = float(x)
    _check(math.isfinite(x), key, f"expected a finite number, got {_show(value)}")
    if integer:
        _check(x.is_integer(), key, _mismatch(hint, value, nullable))
        return int(x)
    return x


def _mapping(value: Any, key: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        where = "" if key else " of sections at the top level"
        raise ConfigError(key, f"expected a mapping{where}, got {_show(value)}")
    return value


def _reject_unknown(data: Mapping[Any, Any], known: Any, key: str) -> None:
    known = list(known)
    for name in data:
        if name not in known:
            guess = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]!r}?" if guess else f"expected one of {sorted(known)}"
            raise ConfigError(_join(key, str(name)), f"unknown key; {hint}")


def _describe(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list"
        plural = {float: "numbers", int: "integers", str: "strings", bool: "booleans"}
        return f"a list of {len(args)} {plural.get(args[0], 'items')}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


def _mismatch(hint: Any, value: Any, nullable: bool) -> str:
    return f"expected {_describe(hint)}{' or null' if nullable else ''}, got {_show(value)}"


def differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``"a.b: old → new"`` for every leaf where two JSON documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [f"{key.lstrip('.')}: {old!r} → {new!r}"]


def trajectory_part(payload: dict[str, Any]) -> dict[str, Any]:
    """:func:`hashed_part` without ``optim.max_steps``: equal for runs on one trajectory (nothing
    in training depends on the step budget; ``checkpoint.continue_shorter``)."""
    part = hashed_part(payload)
    part.get("optim", {}).pop("max_steps", None)
    return part


def hashed_part(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of a :meth:`RunConfig.to_dict` payload without the keys of :data:`HASH_EXCLUDED`
    (what :meth:`RunConfig.hash` covers; keys missing from older payloads are fine)."""
    payload = copy.deepcopy(payload)
    for dotted in HASH_EXCLUDED:
        *parents, last = dotted.split(".")
        node = payload
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return payload


def _at_least(obj: Any, name: str, low: float, note: str = "") -> None:
    value = getattr(obj, name)
    _check(value >= low, name, f"must be >= {low}{note}, got {_show(value)}")


def _above(obj: Any, name: str, low: float) -> None:
    value = getattr(obj, name)
    _check(value > low, name, f"must be > {low}, got {_show(value)}")


def _check(ok: bool, key: str, detail: str) -> None:
    if not ok:
        raise ConfigError(key, detail)


@lru_cache(maxsize=8)
def _dataset_pairs(root: str, stamp: tuple[int, ...]) -> int:
    """Index the prepared folder once per process and folder state (``stamp``: its subfolders'
    mtimes): listing ImageNet takes seconds, and ``reproduce`` checks it for every row. Returns
    the number of images."""
    from .data.latents import LatentDataset

    return len(LatentDataset(root))


def _checked(key: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``; its ValueError or OSError becomes a ConfigError naming ``key``."""
    try:
        return check(*args)
    except (ValueError, OSError) as err:
        raise ConfigError(key, str(err)) from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _show(value: Any) -> str:
    """A value as the YAML user wrote it: null, true, 'text', [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(_plain(value))


def _not_one_of(value: Any, choices: tuple[str, ...]) -> str:
    return f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _sit_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(SiTConfig)}
