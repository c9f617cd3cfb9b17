"""Run configuration: every malformed params file fails with file + key, the rest resolves."""

import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from diversedit.config import (
    DIGITS_CNN_DIM,
    ConfigError,
    EncoderConfig,
    OptimConfig,
    PrecisionConfig,
    config_from_dict,
    load_config,
)
from diversedit.models import SiT, model_config

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests" / "fixtures" / "bad_params").glob("*.yaml"))
PARAMS = sorted((ROOT / "params" / "train").glob("*.yaml"))
TINY = {"name": "custom", "depth": 6, "hidden_size": 32, "num_heads": 4}
DIGITS = {"kind": "digits", "image_size": 16}


def digits(**sections):
    return {"name": "t", "model": dict(TINY), "data": dict(DIGITS)} | sections


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A working directory with a partial and a complete prepared-ImageNet folder."""
    for sub in ("imagenet_partial/images", "imagenet_ok/images", "imagenet_ok/vae-sd", "weights"):
        (tmp_path / sub).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def expectation(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect: <regex>' line"
    return first.removeprefix("# expect: ")


def test_bad_params_are_many_and_distinct():
    assert len(BAD) >= 22
    regexes = [expectation(p) for p in BAD]
    assert len(set(regexes)) == len(regexes)


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_params_fail_with_file_and_key(path, world):
    before = tree(world)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert path.name in message
    assert re.search(expectation(path), message), message
    assert tree(world) == before  # nothing written: no results/ folder, no run directory
    assert not (world / "results").exists()


def test_yaml_1_1_number_strings_are_converted(tmp_path):
    text = "name: t\noptim: {lr: 1e-4, eps: 1e-08, ema_decay: '0.999', max_steps: 4e5}\n"
    assert yaml.safe_load(text)["optim"]["lr"] == "1e-4"  # the trap this guards against
    (tmp_path / "p.yaml").write_text(text)
    optim = load_config(tmp_path / "p.yaml", check_paths=False).optim
    assert (optim.lr, optim.eps, optim.ema_decay) == (1e-4, 1e-8, 0.999)
    assert optim.max_steps == 400_000 and type(optim.max_steps) is int
    assert type(config_from_dict({"name": "t", "optim": {"lr": 1}}).optim.lr) is float


def test_bare_no_means_no_mixed_precision(tmp_path):
    (tmp_path / "p.yaml").write_text("name: t\nprecision: {mixed_precision: no}\n")
    cfg = load_config(tmp_path / "p.yaml", check_paths=False)
    assert cfg.precision.mixed_precision == "no"


def test_dotted_overrides(tmp_path):
    path = ROOT / "params" / "train" / "digits_sit.yaml"
    overrides = {
        "optim.lr": "2e-4",
        "optim.betas": "[0.9, 0.95]",
        "model.long_skip": "true",
        "precision.mixed_precision": "bf16",
        "objective.diversity.pairs": "star",  # a key under a null term switches it on
        "logging.cka_every": 0,
    }
    cfg = load_config(path, overrides, check_paths=False)
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.model_config().long_skip and cfg.precision.mixed_precision == "bf16"
    assert cfg.objective.diversity.pairs == "star" and cfg.logging.cka_every == 0
    assert load_config(path, {"objective.diversity": None}, check_paths=False) == load_config(
        path, check_paths=False
    )
    with pytest.raises(ConfigError, match=r"digits_sit\.yaml \(overrides\): optim\.lrr: .*'lr'"):
        load_config(path, {"optim.lrr": 1}, check_paths=False)
    with pytest.raises(ConfigError, match=r"\(overrides\): optim\.global_batch: holds 64, so"):
        load_config(path, {"optim.global_batch.x": 1}, check_paths=False)


def test_derived_model_fields():
    repa = digits(
        encoder={"name": "digits-cnn"}, objective={"repa": {"encoder_depth": 5}, "diversity": {}}
    )
    cfg = config_from_dict(repa)
    m = cfg.model_config()
    assert m.z_dims == (DIGITS_CNN_DIM,) and m.encoder_depth == 5
    assert (m.input_size, m.in_channels, m.num_classes) == (16, 1, 10)
    assert not m.interval_embedding and m.sra_student_depth == 0
    assert cfg.objective.diversity.pair_encoder_depth == 5  # follows REPA (method-spec §5.3)
    explicit = digits(
        encoder={"name": "digits-cnn"},
        objective={"repa": {"encoder_depth": 5}, "diversity": {"pair_encoder_depth": 6}},
    )
    assert config_from_dict(explicit).objective.diversity.pair_encoder_depth == 6
    off = config_from_dict({"name": "t", "objective": {"diversity": {}}})
    assert off.model_config().z_dims == () and off.objective.diversity.pair_encoder_depth == 8
    zero = digits(
        encoder={"name": "digits-cnn"}, objective={"repa": {"coeff": 0, "encoder_depth": 2}}
    )
    assert config_from_dict(zero).model_config().z_dims == ()
    mf = config_from_dict(digits(objective={"meanflow": {}}))
    assert mf.model_config().interval_embedding
    sra = config_from_dict(digits(objective={"sra": {"student_depth": 2, "teacher_depth": 5}}))
    assert sra.model_config().sra_student_depth == 2
    weights = "w.pth"
    for name, dim in (("dinov2-vit-s", 384), ("dinov2-vit-b", 768), ("dinov2-vit-l", 1024)):
        big = {
            "name": "t",
            "encoder": {"name": name, "weights": weights},
            "objective": {"repa": {}},
        }
        m = config_from_dict(big).model_config()
        assert m.z_dims == (dim,) and (m.input_size, m.in_channels, m.num_classes) == (32, 4, 1000)
    # consistent restatements are fine
    same = digits(model=TINY | {"in_channels": 1, "input_size": 16, "z_dims": []})
    assert config_from_dict(same) == config_from_dict(digits())


def test_defaults_are_the_paper_values():
    cfg = config_from_dict({"name": "t"})
    assert cfg.model_config() == model_config("SiT-B/2")
    assert (cfg.seed, cfg.results_dir) == (0, "results")
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.eps) == (1e-4, (0.9, 0.999), 0.0, 1e-8)
    assert (o.grad_clip, o.ema_decay, o.global_batch) == (1.0, 0.9999, 256)
    assert (o.grad_accum, o.max_steps) == (1, 400_000)
    p = cfg.precision
    assert (p.mixed_precision, p.allow_tf32, p.compile) == ("fp16", True, None)
    assert not p.compile_on(torch.device("cpu"))
    log = cfg.logging
    assert (log.log_every, log.cka_every, log.cka_probe_size) == (100, 0, 16)
    assert log.tensorboard and log.progress
    assert (cfg.checkpoint.every, cfg.checkpoint.keep_last) == (5000, 3)
    d = cfg.data
    assert (d.kind, d.image_size, d.channels, d.latent_scale, d.num_workers) == (
        "imagenet_latents",
        256,
        4,
        0.18215,
        4,
    )
    assert (cfg.encoder.name, cfg.encoder.weights, cfg.encoder.resolution) == ("none", None, 256)
    assert cfg.objective.repa is None and cfg.objective.diversity is None


def _pretend_gpu(monkeypatch, capability: tuple[int, int], has_triton: bool) -> None:
    """A CUDA device of ``capability``, with Triton installed or not."""
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "triton":
            return object() if has_triton else None
        return real(name, *args)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("capability", "has_triton", "expected"),
    [((9, 0), True, True), ((6, 1), True, False), ((9, 0), False, False)],
)
def test_compile_default_follows_device(monkeypatch, capability, has_triton, expected):
    _pretend_gpu(monkeypatch, capability, has_triton)
    cuda = torch.device("cuda")
    assert PrecisionConfig().compile_on(cuda) is expected
    assert PrecisionConfig(compile=False).compile_on(cuda) is False
    assert PrecisionConfig(compile=True).compile_on(torch.device("cpu")) is True


@pytest.mark.parametrize(
    ("capability", "has_triton", "precision", "update", "triton"),
    [
        ((9, 0), True, "bf16", "triton", True),
        ((8, 0), True, "no", "triton", True),
        ((9, 0), True, "fp16", "library", False),  # scaler on the host; fp16 kernels untimed
        ((7, 5), True, "bf16", "library", False),  # below what Triton supports
        ((9, 0), False, "bf16", "library", False),  # no Triton installed
    ],
)
def test_triton_defaults_follow_device(
    monkeypatch, capability, has_triton, precision, update, triton
):
    """precision.update and precision.diversity_triton left null: the Triton kernels on GPUs of
    compute capability 8.0+ (the update with bf16 or no mixed precision only); explicit values
    and options the kernels lack win; never on the CPU."""
    from diversedit.losses.diversity import DiversityConfig

    _pretend_gpu(monkeypatch, capability, has_triton)
    cuda, cpu, div = torch.device("cuda"), torch.device("cpu"), DiversityConfig()
    prec = PrecisionConfig(mixed_precision=precision)
    assert prec.update_on(cuda) == update
    assert prec.diversity_triton_on(cuda, div) is triton
    assert prec.diversity_triton_on(cuda, None) is False  # no diversity loss
    unsupported = dataclasses.replace(div, stats_dtype="autocast")
    assert prec.diversity_triton_on(cuda, unsupported) is False
    assert (prec.update_on(cpu), prec.diversity_triton_on(cpu, div)) == ("library", False)
    explicit = PrecisionConfig(mixed_precision="bf16", update="compiled", diversity_triton=False)
    assert explicit.update_on(cuda) == "compiled"
    assert explicit.diversity_triton_on(cuda, div) is False
    with pytest.raises(ConfigError, match=r"update.*'triton' needs mixed_precision bf16"):
        PrecisionConfig(update="triton")  # release default fp16
    with pytest.raises(ConfigError, match=r"update.*expected one of 'library'"):
        PrecisionConfig(update="fast")


def reorder(value):
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    return value


def test_hash_identity():
    base = config_from_dict(yaml.safe_load((PARAMS[0]).read_text()))
    data = base.to_dict()
    h = base.hash()
    assert re.fullmatch(r"[0-9a-f]{10}", h)
    assert config_from_dict(reorder(data)).hash() == h
    assert base.run_dir() == Path("results") / "runs" / f"{base.name}-{h}"

    def changed(dotted, value):
        d = json.loads(json.dumps(data))
        *parents, last = dotted.split(".")
        node = d
        for part in parents:
            node = node[part]
        node[last] = value
        return config_from_dict(d).hash()

    assert changed("optim.lr", 2e-4) != h
    assert changed("seed", 1) != h
    assert changed("model.long_skip", not data["model"]["long_skip"]) != h
    for dotted, value in [
        ("name", "other"),
        ("results_dir", "elsewhere"),
        ("logging.log_every", 7),
        ("logging.cka_every", 3),
        ("checkpoint.every", 9),
        ("data.num_workers", 0),
        ("precision.compile", True),
        ("precision.compile_mode", "max-autotune"),
        ("precision.compile_scope", "blocks"),
        ("precision.diversity_triton", True),
        ("precision.update", "triton"),
    ]:
        assert changed(dotted, value) == h, dotted


@pytest.mark.parametrize("path", PARAMS, ids=[p.stem for p in PARAMS])
def test_params_files_load_and_round_trip(path, tmp_path):
    cfg = load_config(path, check_paths=False)
    assert cfg.name == path.stem.replace("_", "-")
    data = cfg.to_dict()
    json.dumps(data, allow_nan=False)  # plain JSON types
    assert config_from_dict(data) == cfg
    assert load_config(data, check_paths=False) == cfg
    for suffix, dump in ((".yaml", yaml.safe_dump), (".json", json.dumps)):
        (tmp_path / f"c{suffix}").write_text(dump(data))
        again = load_config(tmp_path / f"c{suffix}", check_paths=False)
        assert again == cfg and again.hash() == cfg.hash()
    m = cfg.model_config()
    assert m.long_skip == ("diversedit" in path.stem)
    if cfg.data.kind == "digits":  # tiny: build it, so the derived fields really fit a SiT
        model = SiT(m)
        assert len(model.projectors) == int(cfg.repa_on)
        assert m.depth == 6 and m.input_size == 16 and m.in_channels == 1
    else:
        assert (cfg.optim.max_steps, cfg.optim.global_batch) == (400_000, 256)
        assert cfg.precision.mixed_precision == "fp16"
        assert cfg.objective.diversity.pair_encoder_depth == 8


def test_paper_params_need_their_assets(world, monkeypatch):
    path = ROOT / "params" / "train" / "repa_b2_diversedit.yaml"
    with pytest.raises(
        ConfigError, match=r"repa_b2_diversedit\.yaml: encoder\.weights: .*pretrain"
    ):
        load_config(path)
    (world / "w.pth").write_bytes(b"")
    ok = {"encoder.weights": "w.pth", "data.path": "imagenet_ok"}
    with pytest.raises(ConfigError, match=r"encoder\.weights: w\.pth is not a readable PyTorch"):
        load_config(path, ok)
    # contents are checked by tests/test_encoders.py and tests/test_data.py
    monkeypatch.setattr("diversedit.encoders.check_weights", lambda *_: None)
    monkeypatch.setattr("diversedit.data.latents.LatentDataset", lambda _: range(1_281_167))
    assert load_config(path, ok).encoder.weights == "w.pth"
    with pytest.raises(ConfigError, match=r"data\.path: 'imagenet_partial' has no vae-sd/"):
        load_config(path, ok | {"data.path": "imagenet_partial"})


def test_sections_validate_on_direct_construction():
    with pytest.raises(ConfigError, match=r"^lr: must be > 0"):
        OptimConfig(lr=0.0)
    repa = digits(encoder={"name": "digits-cnn"}, objective={"repa": {"encoder_depth": 2}})
    cfg = config_from_dict(repa)
    faster = dataclasses.replace(cfg, optim=OptimConfig(lr=2e-4))
    assert faster.optim.lr == 2e-4 and faster.hash() != cfg.hash()
    with pytest.raises(ConfigError, match=r"^objective\.repa: REPA .*encoder\.name is 'none'"):
        dataclasses.replace(cfg, encoder=EncoderConfig())


def test_config_error_is_a_value_error_that_pickles():
    err = ConfigError("optim.lr", "expected a number, got 'fast'", "params/x.yaml")
    assert isinstance(err, ValueError)
    assert str(err) == "params/x.yaml: optim.lr: expected a number, got 'fast'"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
