"""Sampling at scale: resumable, shard-invariant generation into an ADM ``samples.npz``.

Work is cut into fixed chunks of ``batch_size`` samples indexed globally; chunk ``c`` is made by
process ``c % num_processes`` with its own ``torch.Generator`` seeded from ``(seed, c)``, so the
samples depend neither on the number of processes nor on interruptions. Each finished chunk is
written atomically to ``out_dir/chunks/``; a rerun skips the chunks that exist. When all exist,
process 0 merges them into ``samples.npz`` (``arr_0``: uint8 N×H×W×3, the ADM layout),
``labels.npy``, ``grid.png`` and ``sampling.json`` (everything the samples were made with).

``diversedit sample RUN_DIR --mode sde --steps 250`` (see :func:`main`) also works under
``accelerate launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import list_checkpoints, load_latest
from .config import ConfigError, differences
from .files import atomic_write
from .models.sit import SiT, SiTConfig, config_from_state_dict
from .numerics import allow_tf32
from .sampling import SAMPLERS, sample
from .triton_support import compile_default_on

__all__ = [
    "ATTENTION_KERNELS",
    "QUANTISATION",
    "SamplingConfig",
    "attention_kernel",
    "build_parser",
    "chunk_seed",
    "default_out_dir",
    "generate",
    "load_for_sampling",
    "main",
    "model_autocast",
    "sample_run",
    "sampling_network",
]

QUANTISATION = "REPA: clamp(255·(x+1)/2) truncation"
CHUNK_SEED = "numpy.random.SeedSequence([seed, chunk]).generate_state(1, uint64)[0] & (2**63 - 1)"
ATTENTION_KERNELS = {
    True: "fused SDPA (torch.nn.functional.scaled_dot_product_attention)",
    False: "math (softmax(q·kᵀ/√d)·v, timm fallback)",
}
DECODERS = ("auto", "identity", "vae")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_PREFIXES = ("projectors.", "sra_head.")  # training-only heads, unused when sampling
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamp: the merged npz is byte-reproducible


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are made (defaults: the paper tables' no-CFG setting, SDE 250 steps)."""

    mode: str = "sde"  # sde | ode | ode_heun | meanflow
    num_steps: int = 250
    cfg_scale: float = 1.0  # Table 2: 1.8 with guidance_high 0.7
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    guided_channels: int | None = None  # None = all channels (REPA); 3 = DiT/SiT legacy
    num_samples: int = 50_000
    batch_size: int = 64  # per process; also the chunk size, so it changes the samples
    seed: int = 0
    decoder: str = "auto"  # auto: identity for pixel-space (digits) runs, SD-VAE for latents
    vae: str = "stabilityai/sd-vae-ft-mse"  # local dir or hub id (REPA's generate uses ema)
    latent_scale: float = 0.18215
    precision: str = "fp32"  # autocast dtype of the model: fp32 | bf16 | fp16
    tf32: bool = True  # CUDA: TF32 tensor cores for float32 math (REPA's generate.py --tf32)

    def __post_init__(self) -> None:
        positive = "an int >= 1"
        checks = {  # field: (valid, what it must be)
            "mode": (self.mode in SAMPLERS, f"one of {SAMPLERS}"),
            "num_steps": (_is_int(self.num_steps) and self.num_steps >= 1, positive),
            "cfg_scale": (
                self.cfg_scale >= 1.0 and (self.mode != "meanflow" or self.cfg_scale == 1),
                ">= 1 (1 = no guidance; exactly 1 for meanflow)",
            ),
            "guidance_low": (
                0.0 <= self.guidance_low <= self.guidance_high,
                "in [0, guidance_high]",
            ),
            "guidance_high": (self.guidance_high <= 1.0, "<= 1"),
            "guided_channels": (
                self.guided_channels is None
                or (_is_int(self.guided_channels) and self.guided_channels >= 1),
                f"None (all channels) or {positive}",
            ),
            "num_samples": (_is_int(self.num_samples) and self.num_samples >= 1, positive),
            "batch_size": (_is_int(self.batch_size) and self.batch_size >= 1, positive),
            "seed": (_is_int(self.seed) and self.seed >= 0, "an int >= 0"),
            "decoder": (self.decoder in DECODERS, f"one of {DECODERS}"),
            "vae": (isinstance(self.vae, str) and bool(self.vae), "a local dir or a hub id"),
            "latent_scale": (self.latent_scale > 0, "> 0"),
            "precision": (self.precision in PRECISIONS, f"one of {tuple(PRECISIONS)}"),
            "tf32": (isinstance(self.tf32, bool), "true or false"),
        }
        bad = [(key, need) for key, (ok, need) in checks.items() if not ok]
        if bad:
            shown = "; ".join(f"{key}={getattr(self, key)!r} (need {need})" for key, need in bad)
            raise ConfigError(bad[0][0], f"invalid sampling setting: {shown}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_autocast(precision: str, device_type: str) -> torch.autocast:
    """The sampling network's autocast region for ``precision`` (disabled for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def sampling_network(model: nn.Module, compile_model: bool) -> Callable[..., Any]:
    """What sampling calls: ``model``, or with ``compile_model`` ``torch.compile(model,
    dynamic=False)``, compiled on first use, one graph per batch shape (the chunk, twice it
    inside the CFG interval, the last chunk)."""
    return torch.compile(model, dynamic=False) if compile_model else model


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk ``chunk``'s generator: a well-mixed 63-bit function of ``(seed, chunk)``."""
    state = np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def attention_kernel(model: nn.Module) -> str:
    """The attention implementation the model's blocks use (method-spec §9, defect 11)."""
    flags = {
        m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)
    }
    if not flags:
        return "unknown"
    return ATTENTION_KERNELS[flags.pop()] if len(flags) == 1 else "mixed fused SDPA / math"


# --------------------------------------------------------------------------- loading


def _strip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(v, Tensor) for v in obj.values())
        and "pos_embed" in _strip(obj)
    )


def _read_source(source: Path) -> tuple[Any, Path, Path | None]:
    """(loaded object, checkpoint file, run directory or None)."""
    if not source.exists():
        raise FileNotFoundError(
            f"sampling source {source} does not exist: pass a run directory "
            "(results/runs/<name>-<hash>) or a checkpoint file (.pt)"
        )
    if source.is_dir():
        ckpt_dir = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        if not list_checkpoints(ckpt_dir):
            raise FileNotFoundError(f"no step_XXXXXXXX.pt checkpoint in {ckpt_dir}")
        found = load_latest(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint in {ckpt_dir} (all were skipped)")
        state, path = found
        run_dir = source if ckpt_dir != source else None
        return state, path.resolve(), run_dir.resolve() if run_dir else None
    # Our checkpoints hold RNG states and REPA's an argparse Namespace: not weights-only files.
    state = torch.load(source, map_location="cpu", weights_only=False)
    parent = source.resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else None
    return state, source.resolve(), run_dir


def load_for_sampling(
    source: str | Path,
    *,
    which: str = "ema",
    device: torch.device | str | None = None,
    arch: Mapping[str, Any] | None = None,
    fused_attn: bool | None = None,
) -> tuple[SiT, dict[str, Any]]:
    """The network of a run directory (its newest readable checkpoint) or checkpoint file.

    Files may be ours (architecture stored in ``model_config``), REPA / SiT / DiverseDiT ``.pt``
    dicts with ``"ema"`` / ``"model"``, or bare state dicts; the last two are rebuilt with
    :func:`config_from_state_dict` (``arch`` passes its overrides, e.g. ``num_heads`` for a
    non-registry width) after dropping training-only heads (REPA projectors, SRA head).
    ``fused_attn`` overrides the stored attention kernel. Returns the model in eval mode without
    grad (called plainly, no feature taps) and provenance: checkpoint, step, ``which``, format,
    run directory and run config (ours only), architecture, attention kernel.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    state, path, run_dir = _read_source(Path(source))
    step = state.get("step", state.get("steps")) if isinstance(state, Mapping) else None
    run_config = state.get("config") if isinstance(state, Mapping) else None
    dropped: list[str] = []
    if _is_state_dict(state):
        fmt, weights, used = "state_dict", _strip(state), "state_dict"
    elif isinstance(state, Mapping) and which in state and _is_state_dict(state[which]):
        fmt = "diversedit" if "model_config" in state else "foreign"
        weights, used = _strip(state[which]), which
    else:
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{path}: no {which!r} state dict of a SiT model found (keys: {keys})")
    if fmt == "diversedit":  # the architecture is stored: an override may only repeat it
        stored = dict(state["model_config"])
        for key, value in dict(arch or {}).items():
            if stored.get(key) != value:
                raise ConfigError(
                    key, f"{value!r} contradicts the {stored.get(key)!r} stored in {path} (only "
                    "checkpoints without a stored architecture need it)",
                )  # fmt: skip
        config = SiTConfig(**stored)
    else:
        dropped = sorted(k for k in weights if k.startswith(HEAD_PREFIXES))
        weights = {k: v for k, v in weights.items() if k not in dropped}
        try:
            config = config_from_state_dict(weights, **dict(arch or {}))
        except ValueError as err:
            flag = " (command line: --num-heads)" if "num_heads" in str(err) else ""
            raise ConfigError("architecture", f"{path}: {err}{flag}") from None
    if fused_attn is not None:
        config = config.replace(fused_attn=fused_attn)
    model = SiT(config)
    model.load_state_dict(weights, strict=True)
    model = model.to(device or "cpu").eval().requires_grad_(False)
    info = {
        "checkpoint": str(path),
        "step": int(step) if step is not None else None,
        "which": used,
        "format": fmt,
        "run_dir": str(run_dir) if run_dir else None,
        "run_config": run_config,
        "model_config": dataclasses.asdict(config),
        "dropped_keys": dropped,
        "attention_kernel": attention_kernel(model),
    }
    return model, info


# --------------------------------------------------------------------------- files


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str).encode()
    atomic_write(path, lambda f: f.write(text))


def _chunk_path(out_dir: Path, c: int) -> Path:
    return out_dir / "chunks" / f"chunk_{c:06d}.npz"


def _chunk_bounds(cfg: SamplingConfig, c: int) -> tuple[int, int]:
    start = c * cfg.batch_size
    return start, min(start + cfg.batch_size, cfg.num_samples)


def _read_chunk(
    path: Path, size: int, shape: tuple[int, ...] | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(images, labels, whether the network was compiled); chunks made before the flag existed
    were made eagerly."""
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
            compiled = bool(data["compiled"]) if "compiled" in data.files else False
    except Exception as err:
        raise RuntimeError(f"cannot read {path} ({err}); delete it and rerun") from err
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != size or len(labels) != size:
        raise RuntimeError(f"{path} holds {images.dtype} {images.shape}, expected {size} images")
    if shape is not None and images.shape[1:] != shape:
        raise RuntimeError(f"{path} has images of shape {images.shape[1:]}, others {shape}")
    return images, labels, compiled


def _write_npz_stream(path: Path, n: int, chunks: Iterator[np.ndarray]) -> str:
    """Write ``arr_0`` (uint8 N×H×W×3) chunk by chunk into an uncompressed npz (what
    ``np.savez`` writes, with a fixed timestamp); returns the sha256 of the array bytes."""
    digest = hashlib.sha256()

    def write(f: Any) -> None:
        first = next(chunks)
        header = {"descr": "|u1", "fortran_order": False, "shape": (n, *first.shape[1:])}
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            member = zipfile.ZipInfo("arr_0.npy", date_time=_ZIP_TIME)
            with zf.open(member, "w", force_zip64=True) as out:
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(buf, header)
                out.write(buf.getvalue())
                for block in (first, *chunks):
                    data = np.ascontiguousarray(block).tobytes()
                    digest.update(data)
                    out.write(data)

    atomic_write(path, write)
    return digest.hexdigest()


def _grid(images: np.ndarray) -> np.ndarray:
    """Tile up to 64 images row-major into a √n-wide grid (black padding)."""
    n, h, w, ch = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, ch), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return canvas


# --------------------------------------------------------------------------- generation


def _manifest(
    cfg: SamplingConfig,
    num_classes: int,
    latent_shape: Sequence[int],
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """What the chunk files depend on; a resume into ``out_dir`` must match it."""
    keys = ("checkpoint", "step", "which", "decoder", "vae")
    return {
        "sampling": cfg.to_dict(),
        "num_classes": num_classes,
        "latent_shape": list(latent_shape),
        "source": {k: provenance.get(k) for k in keys},
    }


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / "chunks" / "manifest.json"
    wanted = json.loads(json.dumps(manifest, default=str))
    if path.is_file():
        diff = differences(json.loads(path.read_text()), wanted)
        if diff:
            raise ConfigError(
                "out",
                f"{out_dir} holds chunks made with other settings ({'; '.join(diff[:4])}"
                f"{'; …' if len(diff) > 4 else ''}); choose another output folder or delete it",
            )
        return
    _write_json(path, wanted)


def _check_model(model: nn.Module, cfg: SamplingConfig, num_classes: int, shape: tuple) -> None:
    config = getattr(model, "config", None)
    if not isinstance(config, SiTConfig):
        return
    expected = (config.in_channels, config.input_size, config.input_size)
    if num_classes != config.num_classes or shape != expected:
        raise ValueError(
            f"num_classes={num_classes}, latent_shape={shape} do not match the model "
            f"({config.num_classes} classes, latents {expected})"
        )
    if cfg.cfg_scale > 1 and config.class_dropout_prob <= 0:
        raise ValueError("cfg_scale > 1 needs a null class, but the model has no null label row")
    if (cfg.mode == "meanflow") != config.interval_embedding:
        raise ValueError(
            f"mode {cfg.mode!r} does not fit this model: MeanFlow sampling needs (and only works "
            "with) a model trained with the interval embedding"
        )


def _sampler_kwargs(cfg: SamplingConfig) -> dict[str, Any]:
    if cfg.mode == "meanflow":
        return {"num_steps": cfg.num_steps, "cfg_scale": cfg.cfg_scale}
    return {
        "num_steps": cfg.num_steps,
        "cfg_scale": cfg.cfg_scale,
        "guidance_low": cfg.guidance_low,
        "guidance_high": cfg.guidance_high,
        "guided_channels": cfg.guided_channels,
    }


def _make_chunk(
    model: Callable[..., Any],
    cfg: SamplingConfig,
    c: int,
    num_classes: int,
    latent_shape: tuple[int, ...],
    decode: Callable[[Tensor], np.ndarray],
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    start, stop = _chunk_bounds(cfg, c)
    with model_autocast(cfg.precision, device.type):
        x, y = sample(
            model,
            stop - start,
            latent_shape=latent_shape,
            num_classes=num_classes,
            seed=chunk_seed(cfg.seed, c),
            sampler=cfg.mode,
            device=device,
            **_sampler_kwargs(cfg),
        )
    images = np.asarray(decode(x))
    if images.dtype != np.uint8 or images.shape[0] != stop - start or images.shape[-1] != 3:
        raise ValueError(f"decode must return uint8 N×H×W×3, got {images.dtype} {images.shape}")
    return images, y.cpu().numpy().astype(np.int64)


def generate(
    model: nn.Module,
    cfg: SamplingConfig,
    out_dir: str | Path,
    *,
    num_classes: int,
    latent_shape: Sequence[int],
    decode: Callable[[Tensor], np.ndarray],
    process_index: int = 0,
    num_processes: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    provenance: Mapping[str, Any] | None = None,
    barrier: Callable[[], None] | None = None,
    compile_model: bool | None = None,
) -> Path | None:
    """Make this process's missing chunks, then (process 0) merge; returns ``samples.npz``.

    Chunk ``c`` (samples ``[c·B, (c+1)·B) ∩ [0, N)``) is made by process ``c % num_processes``
    from a generator seeded with :func:`chunk_seed` (drawing the initial noise, the labels, then
    the SDE noise). ``decode`` maps sampler output to uint8 N×H×W×3. ``barrier`` (e.g.
    accelerate's ``wait_for_everyone``) runs before the merge; ``provenance`` (checkpoint,
    decoder, …) is recorded in ``sampling.json``. ``compile_model`` samples through
    :func:`sampling_network` (``None``: on CUDA, ×1.14 at XL/2 on an H200, not on the CPU):
    the same mathematics, float rounding aside, so it is not a setting of the samples (a run
    of either kind may finish a folder); each chunk records it and ``sampling.json`` says
    ``compiled``: true, false or "mixed". Other processes return None, as does process 0 while
    another process's chunks are still missing (a warning names them).
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
    out_dir = Path(out_dir)
    shape = tuple(int(s) for s in latent_shape)
    provenance = dict(provenance or {})
    _check_model(model, cfg, num_classes, shape)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if compile_model is None:
        compile_model = compile_default_on(device)
    _check_manifest(out_dir, _manifest(cfg, num_classes, shape, provenance))
    num_chunks = math.ceil(cfg.num_samples / cfg.batch_size)
    mine = range(process_index, num_chunks, num_processes)
    pending = [c for c in mine if not _chunk_path(out_dir, c).is_file()]
    was_training = model.training
    model.eval()  # no label dropout
    try:
        _run_chunks(
            model,
            compile_model,
            cfg,
            out_dir,
            pending,
            num_classes,
            shape,
            decode,
            device,
            progress and process_index == 0,
        )
    finally:
        model.train(was_training)
    if barrier is not None:
        barrier()
    if process_index != 0:
        return None
    missing = [c for c in range(num_chunks) if not _chunk_path(out_dir, c).is_file()]
    if missing:
        warnings.warn(
            f"{out_dir}: {len(missing)} chunk(s) still missing (first {missing[:5]}); run the "
            "other processes, then process 0 again to merge",
            stacklevel=2,
        )
        return None
    info = provenance | {
        "model_config": provenance.get("model_config") or _model_config(model),
        "attention_kernel": attention_kernel(model),
        "device": str(device),
        "num_processes": num_processes,
    }
    return _merge(out_dir, cfg, num_chunks, num_classes, shape, info)


def _run_chunks(
    model: nn.Module,
    compile_model: bool,
    cfg: SamplingConfig,
    out_dir: Path,
    pending: list[int],
    num_classes: int,
    shape: tuple[int, ...],
    decode: Callable[[Tensor], np.ndarray],
    device: torch.device,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    total = sum(stop - start for start, stop in (_chunk_bounds(cfg, c) for c in pending))
    bar = tqdm(total=total, desc="sample", unit="img", disable=not progress)
    network = sampling_network(model, compile_model)
    flag = np.bool_(compile_model)
    with bar, allow_tf32(cfg.tf32):
        for c in pending:
            images, labels = _make_chunk(network, cfg, c, num_classes, shape, decode, device)
            atomic_write(
                _chunk_path(out_dir, c),
                lambda f, i=images, y=labels: np.savez(f, images=i, labels=y, compiled=flag),
            )
            bar.update(len(images))


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def _merge(
    out_dir: Path,
    cfg: SamplingConfig,
    num_chunks: int,
    num_classes: int,
    latent_shape: tuple[int, ...],
    info: dict[str, Any],
) -> Path:
    """Concatenate every chunk into samples.npz / labels.npy; write grid.png, sampling.json."""
    import PIL.Image

    labels: list[np.ndarray] = []
    first: list[np.ndarray] = []
    image_shape: list[tuple[int, ...]] = []
    compiled: set[bool] = set()

    def blocks() -> Iterator[np.ndarray]:
        for c in range(num_chunks):
            start, stop = _chunk_bounds(cfg, c)
            images, y, was_compiled = _read_chunk(
                _chunk_path(out_dir, c), stop - start, image_shape[0] if image_shape else None
            )
            image_shape[:] = [images.shape[1:]]
            compiled.add(was_compiled)
            labels.append(y)
            if start < 64:
                first.append(images[: 64 - start])
            yield images

    samples = out_dir / "samples.npz"
    sha = _write_npz_stream(samples, cfg.num_samples, blocks())
    all_labels = np.concatenate(labels).astype(np.int64)
    atomic_write(out_dir / "labels.npy", lambda f: np.save(f, all_labels))
    grid = PIL.Image.fromarray(_grid(np.concatenate(first)))
    atomic_write(out_dir / "grid.png", lambda f: grid.save(f, format="PNG"))
    for stray in (out_dir / "chunks").glob(".*.tmp"):  # left by interrupted writes
        stray.unlink(missing_ok=True)
    record = {
        "sampling": cfg.to_dict(),
        "num_samples": cfg.num_samples,
        "shape": [cfg.num_samples, *image_shape[0]],
        "num_classes": num_classes,
        "null_label": num_classes if cfg.cfg_scale > 1 else None,
        "latent_shape": list(latent_shape),
        "files": {"samples": samples.name, "labels": "labels.npy", "grid": "grid.png"},
        "arr_0_sha256": sha,
        "quantisation": QUANTISATION,
        "seeds": {
            "seed": cfg.seed,
            "num_chunks": num_chunks,
            "chunk_size": cfg.batch_size,
            "chunk_seed": CHUNK_SEED,
            "draw_order": "per chunk: initial noise N(0, I), labels U[0, num_classes), SDE noise",
            "chunk_seeds": [chunk_seed(cfg.seed, c) for c in range(num_chunks)],
        },
        **info,
        "compiled": compiled.pop() if len(compiled) == 1 else "mixed",  # chunks' network
        "torch": torch.__version__,
        "numpy": np.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(out_dir / "sampling.json", record)
    return samples


# --------------------------------------------------------------------------- runs


def _decoder_kind(cfg: SamplingConfig, info: Mapping[str, Any]) -> str:
    if cfg.decoder != "auto":
        return cfg.decoder
    run_config = info.get("run_config") or {}
    kind = (run_config.get("data") or {}).get("kind")
    if kind is not None:
        return "identity" if kind == "digits" else "vae"
    return "vae" if info["model_config"]["in_channels"] == 4 else "identity"


def _build_decoder(kind: str, cfg: SamplingConfig, device: Any) -> Callable[[Tensor], np.ndarray]:
    from .data.digits import decode_pixels

    if kind == "identity":
        return decode_pixels
    from .data.prepare import decode_latents, load_vae

    vae: list[Any] = []  # loaded on first use: a finished run never loads it

    def decode(z: Tensor) -> np.ndarray:
        if not vae:
            vae.append(load_vae(cfg.vae, device))
        return decode_latents(vae[0], z, cfg.latent_scale)

    return decode


def default_out_dir(cfg: SamplingConfig, info: Mapping[str, Any]) -> Path:
    """``<run_dir>/samples/<hash>`` (or next to a foreign checkpoint file); the 10-hex hash
    covers the sampling settings, the checkpoint file name and step, and ``which``."""
    key = {
        "sampling": cfg.to_dict(),
        "checkpoint": Path(info["checkpoint"]).name,
        "step": info.get("step"),
        "which": info.get("which"),
    }
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    base = Path(info["run_dir"]) if info.get("run_dir") else Path(info["checkpoint"]).parent
    return base / "samples" / digest


def sample_run(
    source: str | Path,
    cfg: SamplingConfig,
    out_dir: str | Path | None = None,
    *,
    device: torch.device | str | None = None,
    which: str = "ema",
    arch: Mapping[str, Any] | None = None,
    fused_attn: bool | None = None,
    progress: bool = True,
    compile_model: bool | None = None,
) -> Path | None:
    """Load ``source``, pick the decoder and :func:`generate` (``compile_model``: see there);
    works under ``accelerate launch``.

    Returns the ``samples.npz`` path on the main process and None on the others.
    """
    from accelerate import PartialState

    state = PartialState()
    device = torch.device(device) if device is not None else state.device
    model, info = load_for_sampling(
        source, which=which, device=device, arch=arch, fused_attn=fused_attn
    )
    kind = _decoder_kind(cfg, info)
    run_data = (info.get("run_config") or {}).get("data") or {}
    run_scale = run_data.get("latent_scale")
    if kind == "vae" and run_scale is not None and run_scale != cfg.latent_scale:
        warnings.warn(
            f"latent_scale {cfg.latent_scale} differs from the run's {run_scale}", stacklevel=2
        )
    info |= {"decoder": "identity" if kind == "identity" else "sd-vae"}
    info["vae"] = cfg.vae if kind == "vae" else None
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg, info)
    config: SiTConfig = model.config
    result = generate(
        model,
        cfg,
        out,
        num_classes=config.num_classes,
        latent_shape=(config.in_channels, config.input_size, config.input_size),
        decode=_build_decoder(kind, cfg, device),
        process_index=state.process_index,
        num_processes=state.num_processes,
        device=device,
        progress=progress,
        provenance=info,
        barrier=state.wait_for_everyone,
        compile_model=compile_model,
    )
    if state.is_main_process and result is None:
        raise RuntimeError(f"{out}: chunks are missing after every process finished")
    return result


# --------------------------------------------------------------------------- command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``diversedit sample`` (added to ``parser`` when given)."""
    d = SamplingConfig()
    p = parser or argparse.ArgumentParser(prog="diversedit sample", description=__doc__)
    p.add_argument("source", type=Path, help="run directory or checkpoint file (.pt)")
    p.add_argument("--mode", default=d.mode, choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=d.num_steps)
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--guidance-low", type=float, default=d.guidance_low)
    p.add_argument("--guidance-high", type=float, default=d.guidance_high)
    p.add_argument("--guided-channels", type=int, default=None, help="3: DiT/SiT legacy quirk")
    p.add_argument("--num", type=int, default=d.num_samples, help="number of samples")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (= chunk)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--decoder", default=d.decoder, choices=DECODERS)
    p.add_argument("--vae", default=d.vae, help="local SD-VAE directory or hub id")
    p.add_argument("--latent-scale", type=float, default=d.latent_scale)
    p.add_argument("--precision", default=d.precision, choices=tuple(PRECISIONS))
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=d.tf32,
        help="CUDA: TF32 matmuls and convolutions for float32 math (REPA's default)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the network (same samples up to float rounding; default: on CUDA, "
        "off on the CPU; the release samples eagerly)",
    )
    p.add_argument("--which", default="ema", choices=("ema", "model"))
    p.add_argument("--num-heads", type=int, default=None, help="for foreign non-registry widths")
    p.add_argument(
        "--attention",
        default="checkpoint",
        choices=("checkpoint", "fused", "math"),
        help="attention kernel (default: as stored in the checkpoint)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="default: <run>/samples/<hash>")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        mode=args.mode,
        num_steps=args.steps,
        cfg_scale=args.cfg_scale,
        guidance_low=args.guidance_low,
        guidance_high=args.guidance_high,
        guided_channels=args.guided_channels,
        num_samples=args.num,
        batch_size=args.batch_size,
        seed=args.seed,
        decoder=args.decoder,
        vae=args.vae,
        latent_scale=args.latent_scale,
        precision=args.precision,
        tf32=args.tf32,
    )


def run_args(args: argparse.Namespace) -> Path | None:
    """Run a parsed ``diversedit sample`` command; invalid settings exit with status 2."""
    import sys

    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        result = sample_run(
            args.source,
            cfg,
            args.out,
            device=args.device,
            which=args.which,
            arch={"num_heads": args.num_heads} if args.num_heads else None,
            fused_attn={"checkpoint": None, "fused": True, "math": False}[args.attention],
            progress=not args.no_progress,
            compile_model=args.compile,
        )
    except ConfigError as err:  # e.g. an output folder of other settings: before any sampling
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if result is not None:
        print(f"samples: {result}")
    return result


def main(argv: Sequence[str] | None = None) -> Path | None:
    """``diversedit sample SOURCE [--mode sde --steps 250 --cfg-scale 1.0 … --out DIR]``."""
    return run_args(build_parser().parse_args(argv))
