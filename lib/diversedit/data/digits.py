"""CPU-tier real data: scikit-learn's bundled 8×8 handwritten digits (no download).

Pixel space stands in for the latent space (an identity "VAE"): ``x0`` lies in [-1, 1] and
:func:`decode_pixels` applies REPA's quantisation, so reference images and generated samples are
turned into uint8 the same way.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("all", "train", "test")
TEST_FRACTION = 0.2
NATIVE_SIZE = 8


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits (images 0..16, N×8×8; labels), parsed once per process (read-only)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    digits.images.flags.writeable = False
    digits.target.flags.writeable = False
    return digits.images, digits.target


@lru_cache(maxsize=8)
def _split_indices(split: str, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    labels = _raw()[1]
    idx = np.arange(len(labels))
    if split == "all":
        return idx
    train, test = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=seed, shuffle=True
    )
    return np.sort(train if split == "train" else test)


def dataset_size(split: str = "all", seed: int = 0) -> int:
    """Images in a split (1,797 in all)."""
    return len(_split_indices(split, seed))


def _load(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(float images in [0, 1], N×8×8; int64 labels) of a split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _raw()
    idx = _split_indices(split, seed)
    return images[idx].astype(np.float32) / 16.0, labels[idx].astype(np.int64)


def digits_pixels(
    split: str = "all", image_size: int = NATIVE_SIZE, channels: int = 1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(x0 float32 N×C×S×S in [-1, 1], labels int64 N)``; bilinear upsampling when S > 8."""
    if image_size < NATIVE_SIZE:
        raise ValueError(f"image_size must be >= {NATIVE_SIZE}, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    images, labels = _load(split, seed)
    x = torch.from_numpy(images)[:, None]
    if image_size != NATIVE_SIZE:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1).expand(-1, channels, -1, -1).contiguous()
    return x, torch.from_numpy(labels)


def decode_pixels(x: Tensor) -> np.ndarray:
    """Identity-"VAE" decode with REPA's quantisation: (x + 1)/2 → clamp(255·x, 0, 255) → uint8
    (truncation). ``x`` is N×C×H×W with C ∈ {1, 3}; returns uint8 N×H×W×3 (grey replicated)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected N×C×H×W with C in (1, 3), got {tuple(x.shape)}")
    x = (x.detach().float() + 1) / 2
    x = torch.clamp(255 * x, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.contiguous().numpy()


def digits_images(
    split: str = "all", image_size: int = NATIVE_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Reference images for evaluation: ``(uint8 N×S×S×3, int64 labels)``, quantised exactly like
    generated samples (:func:`decode_pixels` of the dataset's ``x0``)."""
    x, labels = digits_pixels(split, image_size, 1, seed)
    return decode_pixels(x), labels.numpy()


class DigitsDataset(Dataset):
    """sklearn digits as ``(x0, label, image_uint8)`` items.

    ``x0``: float32 (channels, S, S) in [-1, 1]; ``image_uint8``: uint8 (3, S, S), the RGB
    replication of ``decode_pixels(x0)`` (what the external encoder sees). ``split`` is a fixed
    stratified 80/20 split controlled by ``seed`` (1,437 train / 360 test images)."""

    def __init__(
        self, image_size: int = NATIVE_SIZE, channels: int = 1, split: str = "all", seed: int = 0
    ) -> None:
        self.image_size, self.channels, self.split, self.seed = image_size, channels, split, seed
        self.x0, self.labels = digits_pixels(split, image_size, channels, seed)
        self.images = torch.from_numpy(decode_pixels(self.x0[:, :1])).permute(0, 3, 1, 2)
        self.images = self.images.contiguous()
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        return self.x0[index], int(self.labels[index]), self.images[index]
