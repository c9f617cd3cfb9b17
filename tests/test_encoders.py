"""External encoders: the digits-cnn stand-in (trained, cached) and DINOv2 loading/preprocessing."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diversedit import encoders
from diversedit.data import DigitsDataset
from diversedit.encoders import DIGITS_CNN_DIM, build_encoder, digits_cnn_cache_path

# ----------------------------------------------------------------------------- digits-cnn


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """Train once into a temporary cache, counting calls to the trainer."""
    path = tmp_path_factory.mktemp("cache") / "digits_cnn.pt"
    calls = []
    train = encoders.train_digits_cnn
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoders, "train_digits_cnn", lambda: calls.append(1) or train())
        encoder = build_encoder("digits-cnn", path, resolution=8)
    return encoder, path, calls


def _forbid_training(monkeypatch):
    def fail():
        raise AssertionError("digits-cnn was retrained although a cache exists")

    monkeypatch.setattr(encoders, "train_digits_cnn", fail)


def test_digits_cnn_trains_once_and_loads_from_cache(cnn, monkeypatch):
    encoder, path, calls = cnn
    assert calls == [1] and path.is_file()
    stamp = path.stat().st_mtime_ns
    _forbid_training(monkeypatch)
    again = build_encoder("digits-cnn", path, resolution=8)
    assert path.stat().st_mtime_ns == stamp
    for a, b in zip(encoder.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert again.meta == encoder.meta


def test_digits_cnn_is_trained_once_by_concurrent_builders(cnn, tmp_path, monkeypatch):
    """Two builders that find no cache at once (parallel notebook rows): one trains, the other
    waits on the lock and loads its file."""
    import threading

    _, cached, _ = cnn
    trained, calls = encoders.load_or_train_digits_cnn(cached), []

    def slow_train():
        calls.append(1)
        threading.Event().wait(0.3)  # long enough for the other builder to look for the file
        return trained[0].state_dict(), trained[1]

    monkeypatch.setattr(encoders, "train_digits_cnn", slow_train)
    path, nets = tmp_path / "digits_cnn.pt", []
    workers = [
        threading.Thread(target=lambda: nets.append(encoders.load_or_train_digits_cnn(path)[0]))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert calls == [1] and len(nets) == 2 and path.is_file()
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".digits_cnn.pt.*.tmp"))


def test_digits_cnn_cache_location(cnn, tmp_path, monkeypatch):
    _, path, _ = cnn
    monkeypatch.setenv("DIVERSEDIT_CACHE", str(tmp_path))
    assert digits_cnn_cache_path() == tmp_path / "digits_cnn.pt"
    assert digits_cnn_cache_path(path) == path
    (tmp_path / "digits_cnn.pt").write_bytes(path.read_bytes())
    _forbid_training(monkeypatch)
    assert build_encoder("digits-cnn", None, resolution=8).test_accuracy > 0.9
    monkeypatch.delenv("DIVERSEDIT_CACHE")
    assert (
        digits_cnn_cache_path() == encoders.Path.home() / ".cache" / "diversedit" / "digits_cnn.pt"
    )


def test_stale_cache_is_retrained(cnn, tmp_path, monkeypatch):
    encoder, _, _ = cnn
    stale = tmp_path / "old.pt"
    torch.save({"state_dict": {}, "meta": {"format": "diversedit-digits-cnn/0"}}, stale)
    calls = []
    monkeypatch.setattr(
        encoders,
        "train_digits_cnn",
        lambda: calls.append(1) or (encoder.net.state_dict(), dict(encoder.meta)),
    )
    build_encoder("digits-cnn", stale, resolution=8)
    assert calls == [1]
    assert torch.load(stale, weights_only=True)["meta"]["format"] == encoders.DIGITS_CNN_FORMAT


def test_digits_cnn_refuses_other_files_and_keeps_them(
    cnn, tmp_path, monkeypatch, not_a_checkpoint
):
    """A file that is not a digits-cnn cache fails with its path and is never overwritten."""
    encoder, path, _ = cnn
    _forbid_training(monkeypatch)
    wrong_keys = {"state_dict": {"a": torch.zeros(1)}, "meta": dict(encoder.meta)}
    cases = {
        "garbage.pth": (None, r"not a readable PyTorch checkpoint \(\w+\)"),
        "foreign.pth": ({"a": torch.zeros(1)}, "is not a digits-cnn checkpoint; expected"),
        "wrong_keys.pth": (wrong_keys, r"14 missing keys: features\.0\.weight, .*; 1 unexp"),
    }
    for name, (content, message) in cases.items():
        file = tmp_path / name
        if content is None:
            file.write_bytes(not_a_checkpoint)
        else:
            torch.save(content, file)
        before = file.read_bytes()
        for check in (encoders.check_weights, build_encoder):
            with pytest.raises(ValueError, match=message) as err:
                check("digits-cnn", file)
            assert str(file) in str(err.value) and "weights_only" not in str(err.value)
        assert file.read_bytes() == before
    encoders.check_weights("digits-cnn", path)


def test_digits_cnn_is_a_real_pretrained_classifier(cnn):
    encoder, _, _ = cnn
    test = DigitsDataset(8, split="test")
    with torch.no_grad():
        accuracy = (encoder.logits(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.9
    assert accuracy == pytest.approx(encoder.meta["test_accuracy"], abs=1e-6)
    assert min(encoder.meta["test_accuracy_by_size"].values()) > 0.9  # 8, 16 and 32 px
    assert encoder.meta["standin"] is True and encoder.meta["train_images"] == 1437


def test_digits_cnn_shapes_and_stand_in_naming(cnn):
    encoder, path, _ = cnn
    assert encoder.standin and "stand-in" in encoder.name
    assert encoder.z_dim == DIGITS_CNN_DIM == 64
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training  # frozen: stays in eval mode
    images = DigitsDataset(8, split="test").images[:5]
    with torch.no_grad():
        tokens = encoder(images)
        assert tokens.shape == (5, 16, 64) and encoder.num_tokens == 16  # token_grid 8 // 2
        assert encoder.pooled_features(images).shape == (5, 64)
        assert encoder.logits(images).shape == (5, 10)
        # pooled features = mean of the 4×4 map = mean of the 16 tokens at grid 4
        torch.testing.assert_close(encoder.pooled_features(images), tokens.mean(1))
        big = build_encoder("digits-cnn", path, resolution=16)
        images16 = DigitsDataset(16, split="test").images[:5]
        assert big(images16).shape == (5, 64, 64)
        assert build_encoder("digits-cnn", path, resolution=16, token_grid=2)(images16).shape == (
            5,
            4,
            64,
        )


def test_digits_cnn_is_deterministic():
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    a, meta_a = encoders.train_digits_cnn(epochs=1, limit=256)
    b, meta_b = encoders.train_digits_cnn(epochs=1, limit=256)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a) and meta_a == meta_b
    assert meta_a["train_images"] == 256
    c, _ = encoders.train_digits_cnn(seed=1, epochs=1, limit=256)
    assert not torch.equal(a["head.weight"], c["head.weight"])


# ----------------------------------------------------------------------------- DINOv2 (random)


@pytest.fixture(scope="module")
def shallow_timm():
    """Build every timm model with one block: the same ViT-S/14 layout, fast on CPU."""
    import timm

    create = timm.create_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timm, "create_model", lambda *a, **kw: create(*a, **{"depth": 1, **kw}))
        yield create


@pytest.fixture(scope="module")
def dinov2_file(shallow_timm, tmp_path_factory):
    """A random one-block ViT-S/14 in the original facebookresearch key format at 518 px."""
    torch.manual_seed(0)
    model = shallow_timm("vit_small_patch14_dinov2", depth=1, img_size=224, num_classes=0)
    state = model.state_dict()
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384) * 0.02  # 518-px grid, 37×37
    state["mask_token"] = torch.zeros(1, 384)  # present in the original checkpoints only
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def dinov2(dinov2_file, shallow_timm):
    return build_encoder("dinov2-vit-s", dinov2_file[0], resolution=256)


def test_dinov2_loads_original_checkpoint(dinov2, dinov2_file):
    from timm.layers import resample_abs_pos_embed

    _, state = dinov2_file
    assert (dinov2.z_dim, dinov2.num_tokens, dinov2.standin) == (384, 256, False)
    assert dinov2.model.patch_embed.img_size == (224, 224)
    # REPA: timm.layers.pos_embed.resample_abs_pos_embed(pos_embed, [16, 16]) (bicubic)
    expected = resample_abs_pos_embed(state["pos_embed"], [16, 16])
    torch.testing.assert_close(dinov2.model.pos_embed, expected)
    torch.testing.assert_close(
        dinov2.model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"]
    )
    assert not any(p.requires_grad for p in dinov2.parameters())


def test_dinov2_preprocessing_and_tokens(dinov2):
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    manual = F.interpolate((images / 255.0 - mean) / std, 224, mode="bicubic", align_corners=False)
    x = dinov2.preprocess(images)
    torch.testing.assert_close(x, manual)
    antialiased = F.interpolate(
        (images / 255.0 - mean) / std, 224, mode="bicubic", align_corners=False, antialias=True
    )
    assert (x - antialiased).abs().max() > 1e-2  # REPA's resize has no antialias
    with torch.no_grad():
        tokens = dinov2(images)
        assert tokens.shape == (2, 256, 384)
        full = dinov2.model.forward_features(manual)  # final norm applied, cls token first
        torch.testing.assert_close(tokens, full[:, 1:])
    with pytest.raises(ValueError, match="256-px"):
        dinov2(images[:, :, :128, :128])


def test_dinov2_accepts_timm_format(dinov2, shallow_timm, tmp_path):
    path = tmp_path / "timm.pth"
    torch.save({"model": dinov2.model.state_dict()}, path)
    again = build_encoder("dinov2-vit-s", path, resolution=256)
    for a, b in zip(dinov2.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dinov2_missing_weights_message(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_encoder("dinov2-vit-b", missing)
    message = str(err.value)
    assert "dinov2_vitb14_pretrain.pth" in message and "encoder.weights" in message
    assert str(missing) in message
    with pytest.raises(FileNotFoundError, match=r"encoder\.weights"):
        build_encoder("dinov2-vit-l", None)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("dinov3", None)


def test_dinov2_rejects_unreadable_and_foreign_files(
    dinov2_file, shallow_timm, tmp_path, not_a_checkpoint
):
    garbage, foreign = tmp_path / "garbage.pth", tmp_path / "foreign.pth"
    garbage.write_bytes(not_a_checkpoint)
    torch.save({"a": torch.zeros(1)}, foreign)
    expected = r"; expected dinov2_vits14_pretrain\.pth \(https://.*\) or a timm "
    cases = {
        garbage: r"not a readable PyTorch checkpoint \(\w+\)" + expected,
        foreign: r"not a dinov2-vit-s checkpoint \(\d+ missing keys: cls_token, pos_embed, "
        r"patch_embed\.proj\.weight, …; 1 unexpected keys: a\)" + expected,
    }
    for file, message in cases.items():
        for check in (encoders.check_weights, build_encoder):
            with pytest.raises(ValueError, match=message) as err:
                check("dinov2-vit-s", file)
            assert str(file) in str(err.value) and "weights_only" not in str(err.value)
    with pytest.raises(ValueError, match=r"not a dinov2-vit-b checkpoint \(\d+ shape mismatches"):
        encoders.check_weights("dinov2-vit-b", dinov2_file[0])  # a ViT-S file
    rng = torch.get_rng_state()
    encoders.check_weights("dinov2-vit-s", dinov2_file[0])
    assert torch.equal(torch.get_rng_state(), rng)  # meta-device model: no init, no RNG draws


def test_params_check_names_encoder_weights(dinov2_file, shallow_timm, tmp_path, not_a_checkpoint):
    """load_config (the CLI's check before any work) reports bad weights under their key."""
    from diversedit.config import ConfigError, load_config

    params = Path(__file__).resolve().parents[1] / "params" / "train" / "repa_b2_diversedit.yaml"
    garbage, foreign = tmp_path / "garbage.pth", tmp_path / "foreign.pth"
    garbage.write_bytes(not_a_checkpoint)
    torch.save({"a": torch.zeros(1)}, foreign)
    at = {"data.path": str(tmp_path), "results_dir": str(tmp_path / "r")}
    for file, what in ((garbage, "not a readable"), (foreign, "not a dinov2-vit-b checkpoint")):
        with pytest.raises(ConfigError) as err:
            load_config(params, at | {"encoder.weights": str(file)})
        assert err.value.key == "encoder.weights" and str(file) in err.value.detail
        assert what in err.value.detail and "dinov2_vitb14_pretrain.pth" in err.value.detail
        assert str(err.value).startswith(f"{params} (overrides): encoder.weights: ")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- DINOv2 (real)

REAL = os.environ.get("DIVERSEDIT_DINOV2_WEIGHTS")


@pytest.mark.skipif(not REAL or not os.path.isfile(REAL), reason="DIVERSEDIT_DINOV2_WEIGHTS unset")
def test_dinov2_real_weights():
    state = torch.load(REAL, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    dim = state["cls_token"].shape[-1]
    name = {384: "dinov2-vit-s", 768: "dinov2-vit-b", 1024: "dinov2-vit-l"}[dim]
    encoder = build_encoder(name, REAL, resolution=256)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) // 2]).to(torch.uint8)[None]
    noise = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        tokens = encoder(torch.cat([smooth, smooth.flip(-1), noise]))
    assert tokens.shape == (3, 256, dim) and torch.isfinite(tokens).all()
    pooled = F.normalize(tokens.mean(1), dim=-1)
    # a pretrained encoder maps an image and its mirror closer together than an unrelated image
    assert (pooled[0] @ pooled[1]) > (pooled[0] @ pooled[2])
