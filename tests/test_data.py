"""Data pipeline: sklearn digits, ADM centre crop, SD-VAE preparation (tiny random VAE), latents."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / huggingface_hub are imported

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from diversedit.config import ConfigError, load_config
from diversedit.data import (
    DigitsDataset,
    LatentDataset,
    center_crop_arr,
    decode_latents,
    decode_pixels,
    digits_images,
    load_vae,
    prepare_imagenet,
    sample_latents,
)
from diversedit.data import prepare as prep

SIT_B2 = Path(__file__).resolve().parents[1] / "params" / "train" / "sit_b2_diversedit.yaml"

# ----------------------------------------------------------------------------- digits


def test_digits_splits_are_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    full = DigitsDataset(split="all")
    train, test = DigitsDataset(split="train"), DigitsDataset(split="test")
    assert (len(full), len(train), len(test)) == (1797, 1437, 360)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20 % of each class
    again = DigitsDataset(split="test")
    assert torch.equal(again.x0, test.x0)
    other = DigitsDataset(split="test", seed=1)
    assert not torch.equal(other.x0, test.x0)
    # the split is a partition of the data set
    raw = torch.from_numpy(load_digits().images.astype(np.float32) / 8 - 1)
    both = torch.cat([train.x0[:, 0], test.x0[:, 0]])

    def rows(t):
        return sorted(map(tuple, t.flatten(1).tolist()))

    assert rows(both) == rows(raw)


def test_digits_items_and_pixel_range():
    ds = DigitsDataset(image_size=8, channels=1)
    x0, label, image = ds[5]
    assert x0.dtype == torch.float32 and x0.shape == (1, 8, 8)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert isinstance(label, int) and 0 <= label < 10
    assert ds.x0.min() == -1 and ds.x0.max() == 1
    from sklearn.datasets import load_digits

    raw = load_digits()
    torch.testing.assert_close(x0[0], torch.from_numpy(raw.images[5] / 8.0 - 1).float())
    assert label == raw.target[5]
    assert torch.equal(image, torch.from_numpy(decode_pixels(x0[None])[0]).permute(2, 0, 1))


def test_digits_upsampling_and_channels():
    small = DigitsDataset(image_size=8, split="test")
    big = DigitsDataset(image_size=16, channels=3, split="test")
    assert big.x0.shape == (360, 3, 16, 16) and big.images.shape == (360, 3, 16, 16)
    assert torch.equal(big.x0[:, 0], big.x0[:, 2])
    ref = F.interpolate((small.x0 + 1) / 2, size=16, mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(big.x0[:, :1], ref)
    with pytest.raises(ValueError):
        DigitsDataset(image_size=4)
    with pytest.raises(ValueError):
        DigitsDataset(split="val")


def test_decode_pixels_uses_repa_truncation():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6)
    out = decode_pixels(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    # (x+1)/2*255 = 127.5 → 127 and 191.25 → 191: truncation, not rounding
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]
    assert (out[..., 0] == out[..., 2]).all()
    rgb = torch.stack([torch.full((2, 2), v) for v in (-1.0, 0.0, 1.0)])[None]
    assert decode_pixels(rgb)[0, 0, 0].tolist() == [0, 127, 255]


def test_digits_images_match_dataset():
    images, labels = digits_images("test", image_size=16)
    ds = DigitsDataset(image_size=16, split="test")
    assert images.shape == (360, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, ds.images.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(labels, ds.labels.numpy())


# ----------------------------------------------------------------------------- centre crop


def _noise_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_center_crop_box_path_matches_manual(monkeypatch):
    img = _noise_image(600, 700, 0)
    expected = img
    for size in [(300, 350), (150, 175), (75, 87), (37, 43)]:
        expected = expected.resize(size, resample=PIL.Image.BOX)
    expected = np.array(expected.resize((32, 37), resample=PIL.Image.BICUBIC))[2:34]
    calls = []
    original = PIL.Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        calls.append((tuple(size), resample))
        return original(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "resize", spy)
    out = center_crop_arr(img, 32)
    assert out.shape == (32, 32, 3) and np.array_equal(out, expected)
    assert [r for _, r in calls] == [PIL.Image.BOX] * 4 + [PIL.Image.BICUBIC]
    calls.clear()
    assert center_crop_arr(_noise_image(40, 50, 1), 32).shape == (32, 32, 3)
    assert [r for _, r in calls] == [PIL.Image.BICUBIC]  # short side < 2·res: no box step
    calls.clear()
    assert center_crop_arr(_noise_image(80, 64, 2), 32).shape == (32, 32, 3)
    assert calls == [((40, 32), PIL.Image.BOX), ((40, 32), PIL.Image.BICUBIC)]


def test_center_crop_keeps_the_centre():
    for width, height in [(301, 199), (120, 480), (64, 64)]:
        arr = np.zeros((height, width, 3), np.uint8)
        cy, cx = height // 2, width // 2
        arr[cy - 3 : cy + 3, cx - 3 : cx + 3] = 255
        out = center_crop_arr(PIL.Image.fromarray(arr), 32).astype(float).sum(-1)
        ys, xs = np.nonzero(out > out.max() / 2)
        assert abs(ys.mean() - 15.5) <= 1.0 and abs(xs.mean() - 15.5) <= 1.0, (width, height)


# ----------------------------------------------------------------------------- VAE + prepare

FILES = {"n001/a": (300, 200), "n001/b": (600, 700), "n002/c": (40, 50), "n002/d": (257, 64)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for i, (name, (w, h)) in enumerate(FILES.items()):
        (root / name).parent.mkdir(exist_ok=True)
        _noise_image(w, h, i).save(root / f"{name}.{'png' if i % 2 else 'jpg'}")
    (root / "n001" / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def prepared(vae_dir, source, tmp_path_factory):
    dest = tmp_path_factory.mktemp("prepared")
    n = prepare_imagenet(source, dest, vae=str(vae_dir), resolution=32, batch_size=3, device="cpu")
    return dest, n


def _counting_encoder(monkeypatch):
    seen = []

    def wrapped(vae, images):
        seen.append(len(images))
        return encode(vae, images)

    encode = prep.encode_moments
    monkeypatch.setattr(prep, "encode_moments", wrapped)
    return seen


def test_prepare_writes_crops_moments_and_labels(prepared, source, vae_dir):
    dest, n = prepared
    assert n == 4
    labels = json.loads((dest / "images" / "dataset.json").read_text())
    assert labels["classes"] == ["n001", "n002"]
    assert labels["labels"] == [[f"{k}.png", int(k.startswith("n002"))] for k in sorted(FILES)]
    npy_labels = json.loads((dest / "vae-sd" / "dataset.json").read_text())["labels"]
    assert npy_labels == [[f"{k}.npy", int(k.startswith("n002"))] for k in sorted(FILES)]
    vae = load_vae(vae_dir)
    for i, name in enumerate(FILES):
        ext = "png" if i % 2 else "jpg"
        with PIL.Image.open(source / f"{name}.{ext}") as img:
            crop = center_crop_arr(img.convert("RGB"), 32)
        saved = np.array(PIL.Image.open(dest / "images" / f"{name}.png"))
        assert np.array_equal(saved, crop)
        moments = np.load(dest / "vae-sd" / f"{name}.npy")
        assert moments.shape == (8, 4, 4) and moments.dtype == np.float32
        assert (moments[4:] > 0).all()  # second half is the std
        pixels = torch.from_numpy(crop).permute(2, 0, 1)[None]
        dist = vae.encode(pixels.float() / 127.5 - 1).latent_dist
        ref = torch.cat([dist.mean, dist.std], dim=1)[0]
        torch.testing.assert_close(torch.from_numpy(moments), ref, atol=1e-5, rtol=1e-4)
    assert not list(dest.rglob("*.tmp"))


def test_prepare_resumes_without_re_encoding(prepared, source, vae_dir, monkeypatch):
    dest, _ = prepared
    seen = _counting_encoder(monkeypatch)
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*.npy")}
    assert prepare_imagenet(source, dest, vae=str(vae_dir), resolution=32, device="cpu") == 0
    assert seen == [] and stamps == {p: p.stat().st_mtime_ns for p in dest.rglob("*.npy")}
    (dest / "vae-sd" / "n002" / "c.npy").unlink()
    assert prepare_imagenet(source, dest, vae=str(vae_dir), resolution=32, device="cpu") == 1
    assert seen == [1]
    with pytest.raises(ValueError, match="prepared with"):
        prepare_imagenet(source, dest, vae=str(vae_dir), resolution=64, device="cpu")


def test_two_shards_cover_everything_once(source, vae_dir, tmp_path, monkeypatch):
    seen = _counting_encoder(monkeypatch)
    kw = dict(vae=str(vae_dir), resolution=32, device="cpu", num_processes=2)
    assert prepare_imagenet(source, tmp_path, process_index=1, **kw) == 2
    assert not (tmp_path / "images" / "dataset.json").exists()  # only process 0 writes labels
    assert sorted(p.stem for p in tmp_path.rglob("*.npy")) == ["b", "d"]
    assert prepare_imagenet(source, tmp_path, process_index=0, **kw) == 2
    assert sum(seen) == 4
    assert sorted(
        p.relative_to(tmp_path / "vae-sd").as_posix() for p in tmp_path.rglob("*.npy")
    ) == [f"{k}.npy" for k in sorted(FILES)]
    assert len(LatentDataset(tmp_path)) == 4
    with pytest.raises(ValueError):
        prepare_imagenet(source, tmp_path, process_index=2, **kw)


def test_prepare_limit_is_class_balanced(source, vae_dir, tmp_path):
    kw = dict(vae=str(vae_dir), resolution=32, device="cpu")
    assert prepare_imagenet(source, tmp_path, limit=2, **kw) == 2
    ds = LatentDataset(tmp_path)
    assert ds.image_files == ["n001/a.png", "n002/c.png"] and ds.labels.tolist() == [0, 1]


def test_latent_dataset_reads_prepared_tree(prepared):
    dest, _ = prepared
    ds = LatentDataset(dest)
    assert len(ds) == 4 and ds.num_classes == 2
    moments, label, image = ds[1]
    assert moments.shape == (8, 4, 4) and moments.dtype == torch.float32
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert label == 0 and ds[3][1] == 1
    assert np.array_equal(
        image.permute(1, 2, 0).numpy(), np.array(PIL.Image.open(dest / "images" / "n001/b.png"))
    )
    torch.testing.assert_close(moments, torch.from_numpy(np.load(dest / "vae-sd" / "n001/b.npy")))


def test_latent_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="diversedit prepare"):
        LatentDataset(tmp_path)
    (tmp_path / "images" / "00000").mkdir(parents=True)
    (tmp_path / "vae-sd" / "00000").mkdir(parents=True)
    for i in range(3):
        PIL.Image.new("RGB", (16, 16)).save(tmp_path / "images" / "00000" / f"img{i:08d}.png")
    for i in range(2):
        np.save(tmp_path / "vae-sd" / "00000" / f"img-mean-std-{i:08d}.npy", np.zeros((8, 2, 2)))
    with pytest.raises(ValueError, match="diversedit prepare"):
        LatentDataset(tmp_path)  # 3 images, 2 moment files
    np.save(tmp_path / "vae-sd" / "00000" / "zzz.npy", np.zeros((8, 2, 2)))
    with pytest.raises(ValueError, match="do not match"):
        LatentDataset(tmp_path)
    (tmp_path / "vae-sd" / "00000" / "zzz.npy").unlink()
    np.save(tmp_path / "vae-sd" / "00000" / "img-mean-std-00000002.npy", np.zeros((8, 2, 2)))
    with pytest.raises(FileNotFoundError, match="no labels"):
        LatentDataset(tmp_path)
    # edm2 / REPA layout: labels keyed by the .npy names in vae-sd/dataset.json
    names = [[f"00000/img-mean-std-{i:08d}.npy", 7 - i] for i in range(3)]
    (tmp_path / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": names}))
    ds = LatentDataset(tmp_path)
    assert ds.labels.tolist() == [7, 6, 5] and ds[2][0].dtype == torch.float32


def test_params_check_rejects_an_inconsistent_latent_folder(prepared, tmp_path):
    """data.path is checked as the trainer reads it, before anything is built or written."""
    (tmp_path / "images").mkdir()
    (tmp_path / "vae-sd").mkdir()
    at = {"data.path": str(tmp_path), "data.image_size": 32, "results_dir": str(tmp_path / "r")}
    key = r"sit_b2_diversedit\.yaml \(overrides\): data\.path: "
    with pytest.raises(ConfigError, match=key + r".*0 PNGs under images/ but 0 \.npy under"):
        load_config(SIT_B2, at)
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    np.save(tmp_path / "vae-sd" / "b.npy", np.zeros((8, 4, 4), np.float32))
    with pytest.raises(ConfigError, match=key + r".*do not match \(a\.png paired with b\.npy\)"):
        load_config(SIT_B2, at)
    (tmp_path / "vae-sd" / "b.npy").rename(tmp_path / "vae-sd" / "a.npy")
    (tmp_path / "images" / "dataset.json").write_text("[]")
    with pytest.raises(ConfigError, match=key + r".*dataset\.json is not a labels file"):
        load_config(SIT_B2, at)
    assert not (tmp_path / "r").exists()
    at["data.path"] = str(prepared[0])  # 4 images: the paper's batch of 256 cannot fit
    with pytest.raises(ConfigError, match=r"optim\.global_batch: 256 is more than the 4 images"):
        load_config(SIT_B2, at)
    assert load_config(SIT_B2, at | {"optim.global_batch": 4}).data.image_size == 32


def test_sample_latents_statistics():
    mean = torch.randn(2, 4, 8, 8)
    moments = torch.cat([mean, torch.zeros_like(mean)], dim=1)
    torch.testing.assert_close(sample_latents(moments), mean * 0.18215)
    torch.testing.assert_close(sample_latents(moments, scale=1.0), mean)
    unit = torch.cat([torch.full((64, 4, 16, 16), 2.0), torch.full((64, 4, 16, 16), 3.0)], dim=1)
    z = sample_latents(unit, scale=0.5)
    assert z.shape == (64, 4, 16, 16)
    assert abs(z.mean().item() - 1.0) < 0.02 and abs(z.std().item() - 1.5) < 0.02
    assert not torch.equal(z, sample_latents(unit, scale=0.5))  # fresh noise every call
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_latents(unit, generator=g1), sample_latents(unit, generator=g2))
    assert sample_latents(moments[0]).shape == (4, 8, 8)  # unbatched item
    assert not sample_latents(moments.requires_grad_()).requires_grad
    with pytest.raises(ValueError):
        sample_latents(torch.zeros(2, 7, 4, 4))


def test_decode_latents_and_vae_errors(vae_dir):
    vae = load_vae(vae_dir)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    z = torch.randn(2, 4, 4, 4)
    out = decode_latents(vae, z)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    with torch.no_grad():
        ref = decode_pixels(vae.decode(z / 0.18215).sample)
    assert np.array_equal(out, ref)
    with pytest.raises(
        FileNotFoundError, match="huggingface-cli download stabilityai/sd-vae-ft-mse"
    ):
        load_vae(vae_dir.parent / "missing-vae")
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-ema --local-dir"):
        load_vae("./weights/sd-vae-ft-ema")
