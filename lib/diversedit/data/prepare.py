"""ImageFolder → ADM centre crop → PNG + SD-VAE moments (REPA / edm2 preprocessing).

Output layout (read by :class:`~diversedit.data.latents.LatentDataset`, and by REPA's reader)::

    dest/images/<class>/<name>.png      ADM centre crop at ``resolution``
    dest/images/dataset.json            {"labels": [["<class>/<name>.png", label], ...], "classes"}
    dest/vae-sd/<class>/<name>.npy      float32 concat(posterior mean, std), (8, res/8, res/8)
    dest/vae-sd/dataset.json            the same labels keyed by the .npy paths
    dest/prepare.json                   {"resolution", "vae"}: a resume must use the same settings

Sharding: every process lists the source tree the same way (sorted), takes items
``process_index::num_processes`` and writes only those files, so shards never overlap. The label
files describe the *full* listing and are written only by process 0, after a barrier when
``torch.distributed`` is initialised (``accelerate launch``); each file is written to a temporary
name and renamed, so an interrupted run resumes by skipping every ``.npy`` that already exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from ..files import atomic_write, atomic_write_bytes
from .digits import decode_pixels
from .latents import LABELS_FILE, SD_VAE_SCALE

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


def center_crop_arr(image: PIL.Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop: halve with BOX while the short side ≥ 2·size, BICUBIC-resize the short
    side to ``size``, then crop the centre ``size``×``size`` (returns H×W×C uint8)."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=PIL.Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=PIL.Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def list_image_folder(source: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and ``(relative path, label)`` of every image below a class folder."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {source} does not exist")
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    classes = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for label, name in enumerate(classes):
        files = (p for p in (source / name).rglob("*") if p.suffix.lower() in extensions)
        items += [(p.relative_to(source).as_posix(), label) for p in files if p.is_file()]
    if not items:
        raise FileNotFoundError(f"no images found in class sub-folders of {source}")
    items.sort()
    stems = [path.rsplit(".", 1)[0] for path, _ in items]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{source}: two images differ only by extension; names must be unique")
    return classes, items


def _balanced_subset(items: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """The first ``limit`` items taken round-robin over classes (then re-sorted)."""
    rank: dict[int, int] = {}
    keyed = []
    for path, label in items:
        keyed.append((rank.get(label, 0), label, path))
        rank[label] = rank.get(label, 0) + 1
    chosen = sorted(keyed)[:limit]
    return sorted((path, label) for _, label, path in chosen)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array.astype(np.float32)))


def _check_settings(dest: Path, resolution: int, vae: str) -> None:
    """Refuse to resume into ``dest`` prepared at another resolution or with another VAE."""
    settings = {"resolution": resolution, "vae": Path(vae).name}
    path = dest / "prepare.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise ValueError(f"{dest} was prepared with {old}, not {settings}; use a new dest")
    else:
        text = json.dumps(settings)
        atomic_write_bytes(path, text.encode())


def _write_labels(dest: Path, classes: list[str], items: list[tuple[str, int]]) -> None:
    for folder, suffix in (("images", ".png"), ("vae-sd", ".npy")):
        labels = [[path.rsplit(".", 1)[0] + suffix, label] for path, label in items]
        text = json.dumps({"labels": labels, "classes": classes})
        atomic_write_bytes(dest / folder / LABELS_FILE, text.encode())


def _missing_vae_message(name: str) -> str:
    hub_id = "stabilityai/sd-vae-ft-ema" if "ema" in Path(name).name else DEFAULT_VAE
    return (
        f"SD-VAE not found at {name!r}. Download it once (needs network), e.g.\n"
        f"  huggingface-cli download {hub_id} --local-dir weights/{hub_id.split('/')[1]}\n"
        f"and pass that directory (config.json + diffusion_pytorch_model.safetensors) as the vae."
    )


def load_vae(name_or_path: str | Path, device: torch.device | str | None = None):
    """``diffusers.AutoencoderKL`` in eval mode without grad, from a local directory or a hub id
    (the hub is tried only for ``owner/name`` strings that are not existing paths)."""
    from diffusers import AutoencoderKL

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(_missing_vae_message(name))
    else:
        try:
            vae = AutoencoderKL.from_pretrained(name)
        except Exception as err:  # offline, gated, unknown id …
            raise FileNotFoundError(_missing_vae_message(name)) from err
    return vae.eval().requires_grad_(False).to(device or "cpu")


@torch.no_grad()
def encode_moments(vae, images: Tensor) -> Tensor:
    """uint8 N×3×H×W → float32 concat(mean, std) of the VAE posterior (pixels mapped to [-1, 1])."""
    param = next(vae.parameters())
    x = images.to(param.device, torch.float32) / 127.5 - 1
    dist = vae.encode(x.to(param.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


@torch.no_grad()
def decode_latents(vae, z: Tensor, scale: float = SD_VAE_SCALE) -> np.ndarray:
    """VAE.decode(z / scale) quantised like REPA: uint8 N×H×W×3."""
    param = next(vae.parameters())
    x = vae.decode((z / scale).to(param.device, param.dtype)).sample
    return decode_pixels(x)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prepare_imagenet(
    source: Path,
    dest: Path,
    vae: str = DEFAULT_VAE,
    resolution: int = 256,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    limit: int | None = None,
) -> int:
    """Crop, save and encode this process's shard of ``source``; returns how many images it
    encoded (0 when everything already exists). ``limit`` keeps a class-balanced subset."""
    from tqdm.auto import tqdm

    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
    source, dest = Path(source), Path(dest)
    classes, items = list_image_folder(source)  # a missing source fails before dest is touched
    _check_settings(dest, resolution, str(vae))
    if limit is not None:
        items = _balanced_subset(items, limit)
    pending = [
        (path.rsplit(".", 1)[0], path)
        for path, _ in items[process_index::num_processes]
        if not (dest / "vae-sd" / (path.rsplit(".", 1)[0] + ".npy")).is_file()
    ]
    if pending:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_vae(vae, device)
        bar = tqdm(total=len(pending), desc="prepare", disable=process_index != 0)
        for batch in _batches(pending, batch_size):
            crops = []
            for stem, path in batch:
                with PIL.Image.open(source / path) as img:
                    crop = center_crop_arr(img.convert("RGB"), resolution)
                crops.append(crop)
                png = PIL.Image.fromarray(crop)
                atomic_write(dest / "images" / f"{stem}.png", lambda f, im=png: im.save(f, "PNG"))
            pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
            moments = encode_moments(model, pixels).cpu().numpy()
            for (stem, _), m in zip(batch, moments, strict=True):
                _save_npy(dest / "vae-sd" / f"{stem}.npy", m)
            bar.update(len(batch))
        bar.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if process_index == 0:
        _write_labels(dest, classes, items)
    return len(pending)
