"""External encoders that provide REPA / SRA alignment targets.

* ``dinov2-vit-s|b|l``: timm's DINOv2 ViT/14 loaded from a local checkpoint (the original
  ``dinov2_vit?14_pretrain.pth`` or a timm state dict), position embedding resampled to the
  224·res/256 input grid (16×16 at 256 px), REPA's preprocessing, ``x_norm_patchtokens`` out.
* ``digits-cnn``: the CPU tier's **stand-in** encoder, a small CNN trained here on the sklearn
  digits train split (seconds on CPU) and cached; it is not DINOv2 and is named as a stand-in
  everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .files import atomic_write, file_lock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_TIMM = {
    "dinov2-vit-s": ("vit_small_patch14_dinov2", 384, "dinov2_vits14"),
    "dinov2-vit-b": ("vit_base_patch14_dinov2", 768, "dinov2_vitb14"),
    "dinov2-vit-l": ("vit_large_patch14_dinov2", 1024, "dinov2_vitl14"),
}
DIGITS_CNN = "digits-cnn"
DIGITS_CNN_DIM = 64
DIGITS_CNN_KIND = "diversedit-digits-cnn/"  # every version's cache format starts so
DIGITS_CNN_FORMAT = DIGITS_CNN_KIND + "1"
ENCODER_NAMES = (*DINOV2_TIMM, DIGITS_CNN)


class Encoder(nn.Module):
    """Frozen image encoder: uint8 (N, 3, H, W) → patch tokens (N, T, z_dim).

    Stays in eval mode (``train()`` is a no-op) and holds no trainable parameters; callers run it
    under ``torch.no_grad()`` (and their autocast context, as REPA does)."""

    name: str
    z_dim: int
    standin: bool
    num_tokens: int

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)


# ----------------------------------------------------------------------------- checkpoints


def check_weights(name: str, weights: str | Path) -> None:
    """Raise ValueError, naming the file and what was expected, unless ``weights`` loads into
    encoder ``name`` (keys and shapes are compared with a meta-device model: no compute)."""
    path = Path(weights).expanduser()
    if name in DINOV2_TIMM:
        with torch.device("meta"):
            model = _dinov2_model(name, 256)
        _dinov2_state(name, path, model)
    elif name == DIGITS_CNN:
        _digits_cnn_checkpoint(path)
    else:
        raise ValueError(f"unknown encoder {name!r}; choose from {ENCODER_NAMES}")


def _load(path: Path) -> Any:
    """``torch.load`` of tensors, failing with the file named (not advice to unpickle code)."""
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__})"
        ) from None


def _tensors(state: Any) -> dict[str, Tensor]:
    """The tensor entries of a state dict ({} for anything else)."""
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _mismatch(model: nn.Module, state: dict[str, Tensor]) -> str:
    """How ``state``'s keys and shapes differ from ``model``'s, a few of each ('' if they fit)."""
    want = model.state_dict()
    found = {
        "missing keys": [k for k in want if k not in state],
        "unexpected keys": [k for k in state if k not in want],
        "shape mismatches": [
            f"{k} {tuple(state[k].shape)} ≠ {tuple(want[k].shape)}"
            for k in want
            if k in state and state[k].shape != want[k].shape
        ],
    }
    return "; ".join(
        f"{len(keys)} {kind}: {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"
        for kind, keys in found.items()
        if keys
    )


# ----------------------------------------------------------------------------- DINOv2


def _dinov2_url(name: str) -> str:
    stem = DINOV2_TIMM[name][2]
    return f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth"


def dinov2_missing_message(name: str, path: str | Path | None) -> str:
    """What to download and where to point ``encoder.weights`` for a DINOv2 encoder."""
    stem = DINOV2_TIMM[name][2]
    where = "no file given" if path is None else f"{path} does not exist"
    return (
        f"{name} weights missing ({where}). Download {_dinov2_url(name)} "
        f"(e.g. to weights/{stem}_pretrain.pth) and set `encoder.weights` to that file "
        "(a timm state dict of the same model also works)."
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (or of a folder's model.safetensors / pytorch_model.bin),
    taken out of a ``model``, ``state_dict`` or ``teacher`` entry when there is one."""
    if path.is_dir():
        found = [
            path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()
        ]
        if not found:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    state = _load(path)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return _tensors(state)


def _dinov2_model(name: str, resolution: int) -> nn.Module:
    import timm

    arch = DINOV2_TIMM[name][0]
    return timm.create_model(
        arch, pretrained=False, img_size=224 * resolution // 256, num_classes=0
    )


def _dinov2_state(name: str, path: Path, model: nn.Module) -> dict[str, Tensor]:
    """The checkpoint's tensors in ``model``'s layout (pos-embed resampled by timm's
    ``checkpoint_filter_fn``: bicubic, as REPA's ``resample_abs_pos_embed``); ValueError naming
    the file and what was expected unless every key and shape fits."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch, _, stem = DINOV2_TIMM[name]
    expected = f"expected {stem}_pretrain.pth ({_dinov2_url(name)}) or a timm {arch} state dict"
    try:
        state = _read_state_dict(path)
    except ValueError as err:
        raise ValueError(f"{err}; {expected}") from None
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "dino_head", "ibot"))}
    state = checkpoint_filter_fn(state, model)
    problem = _mismatch(model, state)
    if problem:
        raise ValueError(f"{path} is not a {name} checkpoint ({problem}); {expected}")
    return state


class DinoV2Encoder(Encoder):
    """DINOv2 patch tokens with REPA's preprocessing (÷255 → ImageNet normalise → bicubic)."""

    standin = False

    def __init__(self, name: str, model: nn.Module, resolution: int) -> None:
        super().__init__()
        self.name, self.model, self.resolution = name, model, resolution
        self.z_dim = DINOV2_TIMM[name][1]
        self.input_size = model.patch_embed.img_size[0]
        self.num_tokens = model.patch_embed.num_patches
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """REPA: x/255 → (x − mean)/std → bicubic (no antialias) to 224·res/256."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N×3×H×W images, got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"{self.name} was built for {self.resolution}-px images, got {tuple(images.shape)}"
            )
        x = images.float() / 255.0
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.model.forward_features(self.preprocess(images))
        return tokens[:, self.model.num_prefix_tokens :]


def build_dinov2(name: str, weights: str | Path | None, resolution: int = 256) -> DinoV2Encoder:
    """timm DINOv2 at input 224·res/256 with weights from a local file (ValueError naming the
    file unless it is a checkpoint of this model)."""
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 for patch 14, got {resolution}")
    if weights is None or not Path(weights).expanduser().exists():
        raise FileNotFoundError(dinov2_missing_message(name, weights))
    model = _dinov2_model(name, resolution)
    model.load_state_dict(_dinov2_state(name, Path(weights).expanduser(), model))
    return DinoV2Encoder(name, model.eval().requires_grad_(False), resolution)


# ----------------------------------------------------------------------------- digits-cnn


class DigitsCNN(nn.Module):
    """3×3 convs with GroupNorm/SiLU: grey 8×8 → 64×4×4 map → mean pool (64) → logits (10)."""

    native_size = 8

    def __init__(self, dim: int = DIGITS_CNN_DIM) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.features = nn.Sequential(*block(1, 32), *block(32, dim, 2), *block(dim, dim))
        self.head = nn.Linear(dim, 10)

    @classmethod
    def prepare(cls, images: Tensor) -> Tensor:
        """uint8 (N, 3, S, S) → grey in [-1, 1] at 8×8 (area resize when S ≠ 8)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected N×3×S×S images, got {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True) / 255.0
        if x.shape[-2:] != (cls.native_size, cls.native_size):
            x = F.interpolate(x, size=cls.native_size, mode="area")
        return x * 2 - 1

    def forward(self, x: Tensor) -> Tensor:
        """Feature map (N, 64, 4, 4) of prepared input."""
        return self.features(x)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _one_cycle(step: int, total: int, peak: float) -> float:
    """Learning rate: linear warm-up over 30 % of the steps from peak/25, cosine decay to 0."""
    warm = max(int(0.3 * total), 1)
    if step < warm:
        return peak / 25 + (peak - peak / 25) * step / warm
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


class _Adam:
    """Plain Adam (β = 0.9, 0.999). Written out because creating a ``torch.optim`` optimiser
    imports ``torch._dynamo`` (seconds of start-up in every CPU-tier process that trains it)."""

    def __init__(self, params: list[nn.Parameter], betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.betas, self.eps, self.t = params, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)


def _accuracy(net: DigitsCNN, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        logits = net.head(net(DigitsCNN.prepare(images)).mean(dim=(2, 3)))
    return (logits.argmax(dim=1) == labels).float().mean().item()


def train_digits_cnn(
    seed: int = 0,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 1e-2,
    limit: int | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """Train :class:`DigitsCNN` on the digits train split (CPU, one thread, deterministic).

    Each sample is drawn at 8, 16 or 32 px (the CPU tier's image sizes, resized back to 8 by
    :meth:`DigitsCNN.prepare`) and shifted by ±1 px; ``limit`` keeps the first training images
    (quick checks only). Returns ``(state_dict, meta)``; ``meta`` holds the test accuracy at 8 px
    and per size."""
    from .data.digits import DigitsDataset

    sizes = (8, 16, 32)
    train = {s: DigitsDataset(s, split="train") for s in sizes}
    test = {s: DigitsDataset(s, split="test") for s in sizes}
    gen = torch.Generator().manual_seed(seed)
    with _threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsCNN()
        views = torch.stack([DigitsCNN.prepare(train[s].images[:limit]) for s in sizes])
        y = train[8].labels[:limit]
        n = len(y)
        steps = epochs * -(-n // batch_size)
        adam = _Adam(list(net.parameters()))
        step = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                view = torch.randint(0, len(sizes), (len(idx),), generator=gen)
                dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()  # ±1-px shift
                xb = F.pad(views[view, idx], (1, 1, 1, 1), value=-1.0)
                xb = xb[:, :, dy : dy + 8, dx : dx + 8]
                loss = F.cross_entropy(net.head(net(xb).mean(dim=(2, 3))), y[idx])
                net.zero_grad(set_to_none=True)
                loss.backward()
                adam.step(_one_cycle(step, steps, lr))
                step += 1
        net.eval()
        by_size = {str(s): _accuracy(net, test[s].images, test[s].labels) for s in sizes}
    meta = {
        "format": DIGITS_CNN_FORMAT,
        "standin": True,
        "seed": seed,
        "epochs": epochs,
        "train_images": n,
        "test_images": len(test[8]),
        "test_accuracy": by_size["8"],
        "test_accuracy_by_size": by_size,
        "note": "stand-in encoder for the CPU tier (sklearn digits), not DINOv2",
    }
    return net.state_dict(), meta


def digits_cnn_cache_path(weights: str | Path | None = None) -> Path:
    """``weights`` if given, else ``$DIVERSEDIT_CACHE/digits_cnn.pt`` (the cache directory
    defaults to ``~/.cache/diversedit``)."""
    if weights is not None:
        return Path(weights).expanduser()
    root = os.environ.get("DIVERSEDIT_CACHE") or Path.home() / ".cache" / "diversedit"
    return Path(root).expanduser() / "digits_cnn.pt"


def _digits_cnn_checkpoint(path: Path) -> dict[str, Any] | None:
    """The digits-cnn cache at ``path``, or None when absent or of an older format (retrain it);
    ValueError when the file is anything else, which is never overwritten."""
    if not path.is_file():
        return None
    ckpt = _load(path)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    fmt = str(meta.get("format")) if isinstance(meta, dict) else ""
    expected = (
        f"expected a digits-cnn cache written by diversedit (format {DIGITS_CNN_FORMAT}); "
        "point encoder.weights at a new file to train and cache the CNN there"
    )
    if not fmt.startswith(DIGITS_CNN_KIND):
        raise ValueError(f"{path} is not a digits-cnn checkpoint; {expected}")
    if fmt != DIGITS_CNN_FORMAT:
        return None
    with torch.device("meta"):
        problem = _mismatch(DigitsCNN(), _tensors(ckpt.get("state_dict")))
    if problem:
        raise ValueError(f"{path} is not a digits-cnn checkpoint ({problem}); {expected}")
    return ckpt


def load_or_train_digits_cnn(weights: str | Path | None = None) -> tuple[DigitsCNN, dict]:
    """Load the cached stand-in CNN, training and caching it (atomically) when absent or stale."""
    path = digits_cnn_cache_path(weights)
    ckpt = _digits_cnn_checkpoint(path)
    if ckpt is None:
        with file_lock(path.with_name(f".{path.name}.lock")):
            ckpt = _digits_cnn_checkpoint(path)  # another process may have trained it meanwhile
            if ckpt is None:
                state, meta = train_digits_cnn()
                ckpt = {"state_dict": state, "meta": meta}
                atomic_write(path, lambda f: torch.save(ckpt, f))
    net = DigitsCNN()
    net.load_state_dict(ckpt["state_dict"])
    return net.eval().requires_grad_(False), dict(ckpt["meta"])


class DigitsCNNEncoder(Encoder):
    """Stand-in encoder: the CNN's last map, adaptive-average-pooled to ``token_grid``²
    tokens of dim 64 (a 4×4 map is replicated for grids above 4)."""

    standin = True
    name = "digits-cnn (stand-in)"

    def __init__(self, net: DigitsCNN, meta: dict, token_grid: int) -> None:
        super().__init__()
        if token_grid < 1:
            raise ValueError(f"token_grid must be >= 1, got {token_grid}")
        self.net, self.meta, self.token_grid = net, meta, token_grid
        self.z_dim = DIGITS_CNN_DIM
        self.num_tokens = token_grid**2
        self.test_accuracy = float(meta["test_accuracy"])

    def _map(self, images: Tensor) -> Tensor:
        param = next(self.net.parameters())
        return self.net(DigitsCNN.prepare(images.to(param.device)).to(param.dtype))

    def forward(self, images: Tensor) -> Tensor:
        tokens = F.adaptive_avg_pool2d(self._map(images), self.token_grid)
        return tokens.flatten(2).transpose(1, 2)

    def pooled_features(self, images: Tensor) -> Tensor:
        """(N, 64) global mean of the last map (the FD_digits feature)."""
        return self._map(images).mean(dim=(2, 3))

    def logits(self, images: Tensor) -> Tensor:
        """(N, 10) class logits."""
        return self.net.head(self.pooled_features(images))


# ----------------------------------------------------------------------------- factory


def build_encoder(
    name: str,
    weights: str | Path | None,
    *,
    resolution: int = 256,
    device: torch.device | str | None = None,
    token_grid: int | None = None,
) -> Encoder:
    """Build a frozen encoder by name (``dinov2-vit-s|b|l`` or ``digits-cnn``).

    ``resolution`` is the side of the uint8 images the encoder will receive; for ``digits-cnn``
    ``token_grid`` (default ``resolution // 2``, i.e. patch 2) sets the token grid and
    ``weights`` is the cache file (trained on first use)."""
    if name in DINOV2_TIMM:
        encoder: Encoder = build_dinov2(name, weights, resolution)
    elif name == DIGITS_CNN:
        net, meta = load_or_train_digits_cnn(weights)
        encoder = DigitsCNNEncoder(net, meta, token_grid or max(resolution // 2, 1))
    else:
        raise ValueError(f"unknown encoder {name!r}; choose from {ENCODER_NAMES}")
    return encoder.to(device or "cpu").eval().requires_grad_(False)
