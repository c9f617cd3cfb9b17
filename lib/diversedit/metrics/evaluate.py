"""``diversedit evaluate REF.npz SAMPLES.npz``: ADM-layout files in, metrics + provenance out.

Sample and reference batches use ADM's layout: key ``arr_0``, uint8, N×H×W×3 (RGB), read in
streamed batches (a 50K×256² file is ≈ 9.8 GB). Reference statistics are computed once per
(reference file, extractor, weights) and cached as .npz. With the real Inception and an ADM
reference batch, FID/sFID use the file's precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` and
Precision/Recall the features of its ``arr_0`` images, as ADM's evaluator does; any other
extractor computes everything from ``arr_0`` and names its metrics ``FD_<suffix>`` etc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..files import atomic_write
from .adm import ADM_IS_SPLIT_SIZE, ADM_PR_K, ReferenceStats, compute_metrics
from .extractors import EXTRACTORS, FeatureExtractor, build_extractor

ARRAY_KEY = "arr_0"
PAPER_N = 50_000
QUANTISE_HINT = "quantise as clamp(255 * (x + 1) / 2, 0, 255).astype(uint8) (truncation)"


# ----------------------------------------------------------------------------- ADM .npz I/O


def check_images(shape: Sequence[int], dtype: np.dtype, what: str) -> None:
    """Raise ValueError unless (shape, dtype) is an ADM image batch: uint8, N×H×W×3, N ≥ 1."""
    if np.dtype(dtype) != np.uint8:
        raise ValueError(
            f"{what}: images must be uint8 in [0, 255] (ADM layout), got dtype {np.dtype(dtype)}; "
            f"{QUANTISE_HINT}"
        )
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{what}: images must be N×H×W×3 (NHWC, RGB), got shape {tuple(shape)}"
            + ("; NCHW? transpose to NHWC" if len(shape) == 4 and shape[1] == 3 else "")
        )
    if min(shape) < 1:
        raise ValueError(f"{what}: empty image batch, shape {tuple(shape)}")


def _range_note(path: Path) -> str:
    """min/max of the first values of a non-uint8 arr_0 (for the error message only)."""
    try:
        with _open_array(path) as (_, shape, dtype, reader):
            if reader is None or dtype.hasobject:
                return ""
            count = int(min(np.prod(shape), 1 << 20))
            values = np.frombuffer(reader.read(count * dtype.itemsize), dtype=dtype)
            return f" (first values span [{values.min()}, {values.max()}])" if values.size else ""
    except (ValueError, OSError):
        return ""


@contextmanager
def _open_array(path: Path, key: str = ARRAY_KEY) -> Iterator[tuple]:
    """Yield (zip member names, shape, dtype, reader) for ``key`` of an .npz without loading it;
    reader is None when the array cannot be streamed (Fortran order or unknown .npy version)."""
    with zipfile.ZipFile(path) as zf:
        names = [n.removesuffix(".npy") for n in zf.namelist()]
        if key not in names:
            raise ValueError(f"{path}: no {key!r} array (found {names})")
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                yield names, None, None, None
                return
            yield names, tuple(shape), np.dtype(dtype), None if fortran else f


def npz_keys(path: str | Path) -> list[str]:
    """Array names in an .npz (no data read)."""
    with zipfile.ZipFile(path) as zf:
        return [n.removesuffix(".npy") for n in zf.namelist()]


def adm_npz_info(path: str | Path, what: str = "samples") -> tuple[int, ...]:
    """Validated shape of ``arr_0`` (header only); ValueError with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with _open_array(path) as (_, shape, dtype, _reader):
            pass
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an .npz file ({err})") from None
    if shape is None:  # not streamable: read it to check
        full = _load_full(path)
        shape, dtype = full.shape, full.dtype
    try:
        check_images(shape, dtype, f"{what} {path.name}")
    except ValueError as err:
        raise ValueError(f"{err}{_range_note(path)}") from None
    return shape


def _load_full(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        return data[ARRAY_KEY]


def _read_exact(f: IO[bytes], size: int) -> bytearray:
    data = bytearray()
    while len(data) < size:
        block = f.read(size - len(data))
        if not block:
            raise ValueError(f"truncated array data: expected {size} bytes, got {len(data)}")
        data += block
    return data


def iter_adm_batches(path: str | Path, batch_size: int = 64) -> Iterator[np.ndarray]:
    """Stream ``arr_0`` of an ADM .npz in in-order batches (N_b×H×W×3 uint8)."""
    path = Path(path)
    with _open_array(path) as (_, shape, dtype, reader):
        if reader is None:
            full = _load_full(path)
            for i in range(0, len(full), batch_size):
                yield full[i : i + batch_size]
            return
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buf = _read_exact(reader, count * per_image)
            yield np.frombuffer(buf, dtype=dtype).reshape(count, *shape[1:])


def save_adm_npz(path: str | Path, images: np.ndarray) -> Path:
    """Write uint8 N×H×W×3 images as ADM's ``arr_0`` (uncompressed, atomically; the name is
    kept as given)."""
    images = np.asarray(images)
    check_images(images.shape, images.dtype, "save_adm_npz")
    return atomic_write(
        Path(path), lambda f: np.savez(f, **{ARRAY_KEY: np.ascontiguousarray(images)})
    )


def digits_reference(image_size: int, directory: str | Path) -> Path:
    """The CPU tier's reference batch: all 1,797 digits images at ``image_size`` as an ADM
    ``.npz`` (``directory/digits_<size>.npz``), written once and reused."""
    from ..data.digits import digits_images

    path = Path(directory) / f"digits_{image_size}.npz"
    return path if path.is_file() else save_adm_npz(path, digits_images("all", image_size)[0])


def load_adm_npz(path: str | Path) -> np.ndarray:
    """Validated ``arr_0`` of an ADM .npz (uint8 N×H×W×3), fully loaded."""
    adm_npz_info(path, "images")
    return _load_full(Path(path))


# ----------------------------------------------------------------------------- reference stats


def default_cache_dir() -> Path:
    """``$DIVERSEDIT_CACHE/ref_stats`` (default ``~/.cache/diversedit/ref_stats``)."""
    root = os.environ.get("DIVERSEDIT_CACHE") or Path.home() / ".cache" / "diversedit"
    return Path(root).expanduser() / "ref_stats"


def _cache_key(ref: Path, extractor: FeatureExtractor) -> str:
    st = ref.stat()
    desc = extractor.describe()
    ident = [str(ref.resolve()), st.st_size, st.st_mtime_ns, extractor.name]
    ident += [extractor.metric_suffix, extractor.adm_compatible, desc.get("weights_sha256")]
    ident += [desc.get("tf32")]  # features made with TF32 (before it was switched off) differ
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def reference_stats(
    ref_npz: str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
) -> tuple[ReferenceStats, dict]:
    """Reference statistics for ``extractor``, from the cache when valid; returns (stats, info).

    ADM-compatible (real Inception) + ``mu``/``sigma`` in the file → precomputed FID/sFID
    statistics and features of ``arr_0`` for Precision/Recall; otherwise all from ``arr_0``."""
    ref = Path(ref_npz)
    if not ref.is_file():
        raise FileNotFoundError(f"reference file {ref} does not exist")
    keys = npz_keys(ref)
    key = _cache_key(ref, extractor)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", extractor.name).strip("-")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{ref.stem}-{slug}-{key}.npz"
    if cache_file.is_file():
        cached = ReferenceStats.load(cache_file)
        if cached.key == key:
            return cached, {"cache_file": str(cache_file), "cache": "hit"}
    has_images = ARRAY_KEY in keys
    if has_images:
        adm_npz_info(ref, "reference")
    precomputed = extractor.adm_compatible and {"mu", "sigma"} <= set(keys)
    if precomputed:
        out = ReferenceStats.from_adm_npz(ref)
        if has_images:
            feats = extractor.features(iter_adm_batches(ref, batch_size), batch_size)
            out.pool, out.n = feats["pool"].astype(np.float32), len(feats["pool"])
    elif has_images:
        feats = extractor.features(iter_adm_batches(ref, batch_size), batch_size)
        source = f"computed from {ARRAY_KEY} of {ref.name} with {extractor.name}"
        out = ReferenceStats.from_features(feats, extractor.name, source)
    else:
        raise ValueError(f"reference {ref} has no {ARRAY_KEY!r} images to compute statistics from")
    out.key = key
    out.save(cache_file)
    return out, {"cache_file": str(cache_file), "cache": "written"}


# ----------------------------------------------------------------------------- evaluate


def _versions() -> dict[str, str]:
    import scipy

    versions = {"numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__}
    try:
        import torch_fidelity

        versions["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        pass
    return versions


def evaluate(
    ref_npz: str | Path,
    samples_npz: str | Path,
    *,
    extractor: str | FeatureExtractor = "inception",
    inception_weights: str | Path | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Metrics of an ADM sample batch against a reference batch, with their provenance.

    Returns (and writes to ``out`` as JSON) ``{"metrics", "samples", "reference", "extractor",
    "protocol", "versions"}``; ``metrics`` holds FID/sFID/IS/Precision/Recall (real Inception) or
    FD_<x>/IS_<x>/Precision_<x>/Recall_<x>, plus N_samples, N_ref and extractor."""
    samples = Path(samples_npz)
    shape = adm_npz_info(samples, "samples")
    if str(ref_npz) == "digits":  # the digits images at the samples' resolution
        ref_npz = digits_reference(shape[1], cache_dir or default_cache_dir())
    ref = Path(ref_npz)
    if not ref.is_file():
        raise FileNotFoundError(f"reference file {ref} does not exist")
    if ARRAY_KEY in npz_keys(ref):
        ref_shape = adm_npz_info(ref, "reference")
        if ref_shape[1:] != shape[1:]:
            raise ValueError(
                f"reference images are {ref_shape[1:]} but samples are {shape[1:]}: "
                "evaluate samples at the reference resolution"
            )
    fx = (
        extractor
        if isinstance(extractor, FeatureExtractor)
        else build_extractor(
            extractor, image_size=shape[1], inception_weights=inception_weights, device=device
        )
    )
    ref_stats, cache_info = reference_stats(ref, fx, batch_size=batch_size, cache_dir=cache_dir)
    feats = fx.features(iter_adm_batches(samples, batch_size), batch_size)
    metrics = compute_metrics(
        ref_stats, feats, metric_suffix=fx.metric_suffix, extractor=fx.name, device=device
    )
    precomputed = ref_stats.source.startswith("precomputed")
    reasons = []
    if not fx.adm_compatible:
        reasons.append(f"extractor {fx.name!r} is not the 2015-12-05 Inception")
    if metrics["N_samples"] != PAPER_N:
        reasons.append(f"N_samples = {metrics['N_samples']} != {PAPER_N}")
    if not precomputed:
        reasons.append("reference statistics are not an ADM reference batch's precomputed ones")
    record = {
        "metrics": metrics,
        "samples": {"file": samples.name, "path": str(samples.resolve()), "shape": list(shape)},
        "reference": {
            "file": ref.name,
            "path": str(ref.resolve()),
            "N_images": ref_stats.n,
            "stats_source": ref_stats.source,
            **cache_info,
        },
        "extractor": fx.describe(),
        "protocol": {
            "IS_split_size": ADM_IS_SPLIT_SIZE,
            "IS_splits": -(-metrics["N_samples"] // ADM_IS_SPLIT_SIZE),
            "PR_k": ADM_PR_K,
            "PR_distances": "squared L2, float64 (ADM: float16 with float32 fallback)",
            "FID_sqrtm": "scipy.linalg.sqrtm, 1e-6*I offset if not finite (ADM)",
            "paper_comparable": not reasons,
            "not_comparable_because": reasons,
            "note": "the paper's numbers come from ADM's TensorFlow evaluator; this PyTorch path "
            "agrees with it to about 1e-3 only with the real weights and ADM's reference batch",
        },
        "versions": _versions(),
    }
    generation = samples.parent / "sampling.json"  # written by `diversedit sample`
    if generation.is_file():
        record["generation"] = json.loads(generation.read_text())
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def format_table(record: dict) -> str:
    """The metrics as a two-column text table."""
    metrics = record["metrics"]
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    rows.append(
        ("reference", f"{record['reference']['file']} ({record['reference']['stats_source']})")
    )
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    if not record["protocol"]["paper_comparable"]:
        lines.append(
            "not comparable with the paper: "
            + "; ".join(record["protocol"]["not_comparable_because"])
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diversedit evaluate",
        description="FID/sFID/IS/Precision/Recall of an ADM sample batch (.npz, arr_0 uint8 "
        "N×H×W×3) against a reference batch; digits-cnn gives FD_digits etc.",
    )
    parser.add_argument(
        "ref", type=Path, help='reference batch .npz (ADM layout), or "digits" (CPU tier)'
    )
    parser.add_argument("samples", type=Path, help="sample batch .npz (ADM layout)")
    parser.add_argument("--extractor", choices=EXTRACTORS, default="inception")
    parser.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="local weights-inception-2015-12-05-6726825d.pth (default: "
        "$DIVERSEDIT_INCEPTION_WEIGHTS, then torch hub's checkpoints folder)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default cpu)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reference-stats cache")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prints the metrics table; exit 0 done, 2 bad input or missing files."""
    args = build_parser().parse_args(argv)
    try:
        record = evaluate(
            args.ref,
            args.samples,
            extractor=args.extractor,
            inception_weights=args.inception_weights,
            device=args.device,
            batch_size=args.batch_size,
            out=args.out,
            cache_dir=args.cache_dir,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(record))
    if args.out is not None:
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
