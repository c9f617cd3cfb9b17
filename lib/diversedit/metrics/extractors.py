"""Feature extractors for the metrics: one interface, uint8 NHWC images in, numpy features out.

``features()`` returns a dict with ``pool`` (N, d) for FD/Precision/Recall, ``logits`` (N, C) for
IS and, for the Inception only, ``spatial`` (N, 2023) for sFID.

* :class:`InceptionExtractor`: torch-fidelity 0.4.0's ``inception-v3-compat`` (the TF
  2015-12-05 graph ported to PyTorch) from a **local** weights file; never downloads.
  pool = ``2048`` (ADM ``pool_3``), logits = ``logits_unbiased`` (ADM's IS: 1008 classes, no
  bias), spatial = ADM's ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` output (N×192×17×17, ReLU
  after BN), channels last, first 7 channels, flattened (17·17·7 = 2023). Images go in at native
  size; torch-fidelity resizes to 299 with its TF1-exact bilinear (as ADM's graph) and maps to
  (x − 128)/128.
* :class:`DigitsExtractor`: the digits-cnn stand-in (pool 64-d, 10 logits, no spatial); its
  metrics are named ``FD_digits`` etc., never FID.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor

from ..numerics import allow_tf32

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
INCEPTION_WEIGHTS_ENV = "DIVERSEDIT_INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-compat"
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # ADM "mixed_6/conv:0" (mixed_6 = Mixed_6d)
SPATIAL_CHANNELS = 7
RESIZE_CONVENTION = (
    "native-size uint8 -> torch-fidelity interpolate_bilinear_2d_like_tensorflow1x to 299x299 "
    "(TF1 bilinear, align_corners=False, as the ADM TF graph) -> (x - 128) / 128"
)

ImageInput = np.ndarray | Tensor | Iterable[np.ndarray | Tensor]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _to_nchw_uint8(batch: np.ndarray | Tensor) -> Tensor:
    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        batch = batch.copy()
    x = torch.as_tensor(batch)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be N×H×W×3 (NHWC, RGB), got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


def _batches(images: ImageInput, batch_size: int) -> Iterator[Tensor]:
    """NCHW uint8 batches of at most ``batch_size`` from an array or an iterable of arrays."""
    chunks = [images] if isinstance(images, np.ndarray | Tensor) else images
    for chunk in chunks:
        x = _to_nchw_uint8(chunk)
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]


class FeatureExtractor:
    """Base: ``name`` (recorded with every result), ``metric_suffix`` ("" only for the real
    Inception: FID, sFID, IS, …; e.g. "_digits" → FD_digits), ``adm_compatible`` (may use ADM's
    precomputed reference statistics)."""

    name: str = ""
    metric_suffix: str = ""
    adm_compatible: bool = False
    device: torch.device = torch.device("cpu")

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: ImageInput, batch_size: int = 64) -> dict[str, np.ndarray]:
        """uint8 N×H×W×3 images (array, tensor or iterable of such batches) → float32 features,
        computed in IEEE float32 on CUDA too (TF32 off, whatever the process had set)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        parts: dict[str, list[np.ndarray]] = {}
        for x in _batches(images, batch_size):
            for key, value in self.batch_features(x).items():
                parts.setdefault(key, []).append(value.float().cpu().numpy())
        if not parts:
            raise ValueError("no images given")
        return {k: np.concatenate(v) for k, v in parts.items()}

    @torch.no_grad()
    def batch_features(self, x: Tensor) -> dict[str, Tensor]:
        """Features of one NCHW uint8 batch, on the extractor's device, TF32 off."""
        with allow_tf32(False):
            return self._forward(x.to(self.device, non_blocking=True))

    def describe(self) -> dict:
        """What the features were computed with (for the results record)."""
        return {"name": self.name, "metric_suffix": self.metric_suffix, "tf32": False}


# ----------------------------------------------------------------------------- Inception


def default_inception_weights() -> Path:
    """Where torch-fidelity's download would land: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_missing_message(path: Path) -> str:
    return (
        f"Inception weights not found: {path} does not exist. Download {INCEPTION_WEIGHTS_URL} "
        f"(file {INCEPTION_WEIGHTS_FILE}) and either put it at {default_inception_weights()} "
        f"(torch-fidelity's hub cache) or pass its path with --inception-weights PATH "
        f"(API: inception_weights=PATH; environment: {INCEPTION_WEIGHTS_ENV}=PATH). "
        "No download is attempted and there is no fallback extractor."
    )


def resolve_inception_weights(weights: str | Path | None = None) -> Path:
    """Explicit path, else ``$DIVERSEDIT_INCEPTION_WEIGHTS``, else the hub-cache file (must
    exist: FileNotFoundError naming the file otherwise)."""
    if weights is None:
        weights = os.environ.get(INCEPTION_WEIGHTS_ENV) or default_inception_weights()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(inception_missing_message(path))
    return path


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity ``inception-v3-compat`` from a local file, plus ADM's sFID features.

    ``tag`` marks non-standard weights (e.g. ``"random-inception(seed=0)"`` in tests): the name
    becomes the tag, the metric suffix ``metric_suffix`` (default ``"_" + tag``), so the results
    are never called FID/IS, and ADM's precomputed reference statistics are not used. The weights
    file is read by torch-fidelity with ``torch.load(weights_only=False)``: trusted files only;
    its SHA-256 is recorded."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: torch.device | str | None = None,
        *,
        tag: str | None = None,
        metric_suffix: str | None = None,
    ) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = resolve_inception_weights(weights)
        self.weights_sha256 = sha256_file(self.weights)
        self.tag = tag
        self.name = tag or INCEPTION_NAME
        self.metric_suffix = "" if tag is None else (metric_suffix or f"_{tag}")
        self.adm_compatible = tag is None
        self.device = torch.device(device or "cpu")
        self.model = FeatureExtractorInceptionV3(
            INCEPTION_NAME,
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(self.weights),
        ).to(self.device)
        self._spatial: Tensor | None = None
        layer = self.model.get_submodule(SPATIAL_LAYER)
        layer.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        # NCHW -> NHWC, then the first 7 channels (ADM: spatial[..., :7]), flattened H, W, C.
        nhwc = output.permute(0, 2, 3, 1)[..., :SPATIAL_CHANNELS]
        self._spatial = nhwc.reshape(len(output), -1).clone()

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        self._spatial = None
        pool, logits = self.model(x)
        if self._spatial is None:
            raise RuntimeError(f"the {SPATIAL_LAYER} hook did not fire")
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def describe(self) -> dict:
        info = {
            **super().describe(),
            "architecture": f"torch-fidelity {INCEPTION_NAME}",
            "weights_file": str(self.weights),
            "weights_sha256": self.weights_sha256,
            "weights_url": INCEPTION_WEIGHTS_URL,
            "features": {
                "pool": "2048 (pool_3)",
                "logits": "logits_unbiased (1008, no bias)",
                "spatial": f"{SPATIAL_LAYER} (ADM mixed_6/conv) NHWC[..., :7] -> 2023",
            },
            "resize": RESIZE_CONVENTION,
        }
        if self.tag is not None:
            info["weights"] = f"non-standard ({self.tag}; test only)"
        return info


# ----------------------------------------------------------------------------- digits-cnn


def build_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception with a scale-preserving random init, saved as a state dict.

    For tests and throughput measurements only: its features are not degenerate (the default
    init collapses them), so metric code can be checked offline, but it is never the real
    network. Results computed with it must carry a tag (see :class:`InceptionExtractor`).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    cls = tfi.FeatureExtractorInceptionV3
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None),
    ):
        model = cls("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):  # Kaiming normal, ReLU gain, fan-out
                fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
                module.weight.normal_(0, math.sqrt(2 / fan_out), generator=gen)
        fc = torch.randn(model.fc.weight.shape, generator=gen)
        model.fc.weight.copy_(0.03 * (fc - fc.mean(dim=1, keepdim=True)))
        model.fc.bias.zero_()
    torch.save(model.state_dict(), path)
    return path


class DigitsExtractor(FeatureExtractor):
    """The digits-cnn stand-in: pool = ``pooled_features`` (64), logits = ``logits`` (10).
    No spatial features, so sFD is omitted (not zero)."""

    metric_suffix = "_digits"

    def __init__(
        self,
        image_size: int,
        weights: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        from ..encoders import build_encoder, digits_cnn_cache_path

        self.device = torch.device(device or "cpu")
        self.encoder = build_encoder(
            "digits-cnn", weights, resolution=image_size, device=self.device
        )
        self.name = self.encoder.name
        self.image_size = image_size
        self.weights = digits_cnn_cache_path(weights)

    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"pool": self.encoder.pooled_features(x), "logits": self.encoder.logits(x)}

    def describe(self) -> dict:
        return {
            **super().describe(),
            "weights_file": str(self.weights),
            "weights_sha256": sha256_file(self.weights) if self.weights.is_file() else None,
            "test_accuracy": self.encoder.test_accuracy,
            "features": {"pool": "mean of the last 64-ch map", "logits": "10 digit classes"},
            "resize": "grey mean -> area resize to 8x8 (DigitsCNN.prepare)",
            "note": "stand-in network (sklearn digits); FD_digits is not FID",
        }


EXTRACTORS = ("inception", "digits-cnn")


def build_extractor(
    name: str,
    *,
    image_size: int,
    inception_weights: str | Path | None = None,
    device: torch.device | str | None = None,
) -> FeatureExtractor:
    """``inception`` (real weights from a local file) or ``digits-cnn`` (stand-in)."""
    if name == "inception":
        return InceptionExtractor(inception_weights, device)
    if name == "digits-cnn":
        return DigitsExtractor(image_size, device=device)
    raise ValueError(f"unknown extractor {name!r}; choose from {EXTRACTORS}")
