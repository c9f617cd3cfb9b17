"""Sampling at scale on a real (tiny) digits checkpoint: ADM layout, resume, sharding, loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diversedit.config import ConfigError
from diversedit.data.digits import decode_pixels
from diversedit.generate import (
    QUANTISATION,
    SamplingConfig,
    chunk_seed,
    generate,
    load_for_sampling,
    main,
    sample_run,
)
from diversedit.models import SiT
from diversedit.numerics import allow_tf32
from diversedit.sampling import sample

PARAMS = Path(__file__).resolve().parents[1] / "params" / "train" / "digits_sit.yaml"
SHAPE = (1, 8, 8)
STEPS = 4  # sampler steps: SDE makes exactly STEPS model calls per chunk without CFG


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from diversedit.config import load_config
    from diversedit.train import Trainer

    overrides = {
        "results_dir": str(tmp_path_factory.mktemp("results")),
        "model.depth": 2,
        "model.hidden_size": 32,
        "data.image_size": 8,
        "optim.global_batch": 16,
        "optim.max_steps": 2,
        "optim.lr": 0.01,  # large steps and a short EMA: weights far from the zero-init output
        "optim.ema_decay": 0.5,
        "checkpoint.every": 2,
        "logging.tensorboard": False,
        "logging.cka_every": 0,
    }
    _reset_accelerate()
    path = Trainer(load_config(PARAMS, overrides)).fit()
    _reset_accelerate()
    return path


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_sampling(run_dir)


@pytest.fixture(scope="module")
def reference(loaded, tmp_path_factory):
    """An uninterrupted one-process run with N = 20, batch 8 (3 chunks, the last of 4)."""
    out = tmp_path_factory.mktemp("reference")
    return _gen(loaded[0], out)


def _cfg(**kw) -> SamplingConfig:
    base = {"num_steps": STEPS, "num_samples": 20, "batch_size": 8}
    return SamplingConfig(**(base | kw))


def _gen(model, out, *, cfg=None, **kw):
    return generate(
        model,
        cfg or _cfg(),
        out,
        num_classes=10,
        latent_shape=SHAPE,
        decode=decode_pixels,
        progress=False,
        **kw,
    )


def _arrays(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["arr_0"]


class CallLog:
    """Forward pre-hook recording (batch size, labels, training flag) of every model call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls.append((args[0].shape[0], args[2].clone(), module.training))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_fixture_model_is_not_trivial(loaded):
    model, _ = loaded
    x, t, y = torch.randn(4, *SHAPE), torch.full((4,), 0.5), torch.arange(4)
    assert model(x, t, y).std() > 0.02  # otherwise most checks below could not fail


def test_adm_layout_exact_n_and_grid(reference):
    out = reference.parent
    with np.load(reference) as data:
        assert list(data.keys()) == ["arr_0"]
        images = data["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 3)  # 3 channels from 1
    assert np.array_equal(images[..., 0], images[..., 2])
    assert len(np.unique(images)) > 10
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.int64 and labels.shape == (20,)
    assert labels.min() >= 0 and labels.max() < 10
    assert sorted(p.name for p in (out / "chunks").glob("chunk_*.npz")) == [
        "chunk_000000.npz",
        "chunk_000001.npz",
        "chunk_000002.npz",
    ]
    grid = np.asarray(PIL.Image.open(out / "grid.png"))
    assert grid.shape == (4 * 8, 5 * 8, 3)  # 20 images on a 5-wide grid
    assert np.array_equal(grid[8:16, 16:24], images[7])


def test_chunk_is_seeded_sample_decoded_by_decode_pixels(loaded, reference):
    model, _ = loaded
    with np.load(reference.parent / "chunks" / "chunk_000002.npz") as chunk:
        images, labels = chunk["images"], chunk["labels"]
    x, y = sample(
        model, 4, latent_shape=SHAPE, num_classes=10, seed=chunk_seed(0, 2), num_steps=STEPS
    )
    assert np.array_equal(images, decode_pixels(x)) and np.array_equal(labels, y.numpy())
    assert np.array_equal(_arrays(reference)[16:], images)


def test_resume_regenerates_only_the_missing_chunk(loaded, reference, tmp_path):
    model, _ = loaded
    first = _gen(model, tmp_path)
    assert first.read_bytes() == reference.read_bytes()  # deterministic, byte for byte
    chunks = tmp_path / "chunks"
    kept = {n: (chunks / n).stat().st_mtime_ns for n in ("chunk_000000.npz", "chunk_000002.npz")}
    (chunks / "chunk_000001.npz").unlink()
    first.unlink()
    with CallLog(model) as log:
        again = _gen(model, tmp_path)
    assert [n for n, _, _ in log.calls] == [8] * STEPS  # one chunk of 8, STEPS calls
    assert {n: (chunks / n).stat().st_mtime_ns for n in kept} == kept
    assert again.read_bytes() == reference.read_bytes()
    assert np.array_equal(
        np.load(tmp_path / "labels.npy"), np.load(reference.parent / "labels.npy")
    )


def test_sharding_over_processes_gives_the_same_samples(loaded, reference, tmp_path):
    model, _ = loaded
    with pytest.warns(UserWarning, match="chunk"):
        assert _gen(model, tmp_path, process_index=0, num_processes=2) is None
    names = sorted(p.name for p in (tmp_path / "chunks").glob("chunk_*.npz"))
    assert names == ["chunk_000000.npz", "chunk_000002.npz"]  # c % 2 == 0
    assert _gen(model, tmp_path, process_index=1, num_processes=2) is None
    merged = _gen(model, tmp_path, process_index=0, num_processes=2)
    assert merged.read_bytes() == reference.read_bytes()
    assert json.loads((tmp_path / "sampling.json").read_text())["num_processes"] == 2


def test_seed_and_chunks_change_the_samples(loaded, reference, tmp_path):
    images = _arrays(reference)
    assert not np.array_equal(images[:4], images[8:12])  # chunks draw their own noise
    other = _arrays(_gen(loaded[0], tmp_path, cfg=_cfg(seed=1)))
    assert not np.array_equal(other, images)


def test_sde_and_ode_differ_with_the_same_labels(loaded, reference, tmp_path):
    ode = _gen(loaded[0], tmp_path, cfg=_cfg(mode="ode"))
    assert not np.array_equal(_arrays(ode), _arrays(reference))
    # same draw order per chunk: noise first, then labels
    assert np.array_equal(
        np.load(tmp_path / "labels.npy"), np.load(reference.parent / "labels.npy")
    )


def test_cfg_doubles_the_batch_with_the_null_label_inside_the_interval(loaded, reference, tmp_path):
    model, _ = loaded
    cfg = _cfg(cfg_scale=4.0, guidance_high=0.7, num_samples=8)
    with CallLog(model) as log:
        path = _gen(model, tmp_path, cfg=cfg)
    sizes = [n for n, _, _ in log.calls]
    # SDE grid linspace(1, 0.04, 4) = 1, .68, .36, .04: guided at the last three
    assert sizes == [8, 16, 16, 16]
    assert all((y[8:] == 10).all() and (y[:8] < 10).all() for n, y, _ in log.calls if n == 16)
    assert not np.array_equal(_arrays(path), _arrays(reference)[:8])


def test_sample_run_records_everything(run_dir, loaded, reference):
    _reset_accelerate()
    cfg = _cfg()
    path = sample_run(run_dir, cfg, progress=False)
    out = path.parent
    assert out.parent == run_dir.resolve() / "samples"  # default: <run>/samples/<hash>
    assert path.read_bytes() == reference.read_bytes()
    record = json.loads((out / "sampling.json").read_text())
    model, info = loaded
    assert record["sampling"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert record["checkpoint"] == info["checkpoint"] and record["step"] == 2
    assert record["checkpoint"].endswith("checkpoints/step_00000002.pt")
    assert record["model_config"] == json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert record["decoder"] == "identity" and record["vae"] is None
    assert record["quantisation"] == QUANTISATION
    assert record["attention_kernel"].startswith("fused SDPA")
    assert record["torch"] == torch.__version__ and record["num_samples"] == 20
    assert record["shape"] == [20, 8, 8, 3] and record["seeds"]["seed"] == 0
    assert record["seeds"]["chunk_seeds"] == [chunk_seed(0, c) for c in range(3)]
    assert record["run_config"]["data"]["kind"] == "digits"
    # resuming into the same directory with other settings is refused
    with pytest.raises(ValueError, match="other settings"):
        generate(
            model,
            _cfg(seed=3),
            out,
            num_classes=10,
            latent_shape=SHAPE,
            decode=decode_pixels,
            progress=False,
        )


def test_every_source_form_loads_the_same_network(run_dir, loaded, tmp_path):
    model, info = loaded
    assert info["format"] == "diversedit" and info["which"] == "ema" and info["step"] == 2
    ckpt = Path(info["checkpoint"])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    torch.save({"ema": state["ema"], "steps": 2}, tmp_path / "repa.pt")
    torch.save(state["ema"], tmp_path / "bare.pt")
    heads = {"num_heads": 4}  # width 32 is not a registry size
    sources = [
        load_for_sampling(ckpt),
        load_for_sampling(tmp_path / "repa.pt", arch=heads),
        load_for_sampling(tmp_path / "bare.pt", arch=heads),
    ]
    assert [i["format"] for _, i in sources] == ["diversedit", "foreign", "state_dict"]
    with pytest.raises(ConfigError, match=r"architecture: .*bare\.pt: cannot infer num_heads .*"
                       r"--num-heads"):  # fmt: skip
        load_for_sampling(tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match=r"num_heads: 8 contradicts the 4 stored in"):
        load_for_sampling(ckpt, arch={"num_heads": 8})
    assert load_for_sampling(ckpt, arch=heads)[0].config == model.config  # the same: fine
    assert sources[1][1]["step"] == 2
    cfg = _cfg(num_samples=8)
    want = _arrays(_gen(model, tmp_path / "a", cfg=cfg))
    for k, (m, _) in enumerate(sources):
        assert m.config == model.config
        assert np.array_equal(_arrays(_gen(m, tmp_path / f"s{k}", cfg=cfg)), want)
    torch.manual_seed(123)
    fresh = SiT(model.config).eval()
    assert not np.array_equal(_arrays(_gen(fresh, tmp_path / "fresh", cfg=cfg)), want)
    raw, _ = load_for_sampling(run_dir, which="model")
    for name, tensor in raw.state_dict().items():
        assert torch.equal(tensor, state["model"][name])
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["ema"])


def test_sampling_model_is_in_eval_mode(loaded, reference, tmp_path):
    model, _ = loaded
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()  # label dropout would be on: generate must switch it off
    try:
        with CallLog(model) as log:
            path = _gen(model, tmp_path)
        assert log.calls and not any(training for _, _, training in log.calls)
        assert model.training  # restored
    finally:
        model.eval()
    assert path.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_switches_hold_while_sampling_and_are_restored(loaded, reference, tmp_path, tf32):
    """REPA's generate.py turns TF32 matmuls on unless --no-tf32; ``tf32`` sets both CUDA
    switches for the model calls (and the decoder) and gives back what was set before."""
    model, _ = loaded
    seen = set()

    def switches() -> tuple[bool, bool]:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    handle = model.register_forward_pre_hook(lambda module, args: seen.add(switches()))
    try:
        with allow_tf32(not tf32):
            path = _gen(model, tmp_path, cfg=_cfg(tf32=tf32))
            assert switches() == (not tf32, not tf32)
    finally:
        handle.remove()
    assert seen == {(tf32, tf32)}
    assert path.read_bytes() == reference.read_bytes()  # no TF32 on a CPU: the same samples
    assert json.loads((tmp_path / "sampling.json").read_text())["sampling"]["tf32"] is tf32


@pytest.fixture
def graph_counter(monkeypatch):
    """A factory ``counter(backend="inductor")``: from then on ``torch.compile`` compiles with
    that backend and counts the graphs in the counter it returns; the graph cache is emptied
    before and after the test."""
    from torch._dynamo.testing import CompileCounterWithBackend

    compile_ = torch.compile
    counters = []

    def counted(model, **kwargs):
        return compile_(model, backend=counters[-1], **kwargs)

    def counter(backend="inductor"):
        counters.append(CompileCounterWithBackend(backend))
        return counters[-1]

    monkeypatch.setattr(torch, "compile", counted)
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def _compiled_flags(out: Path) -> list[bool]:
    flags = []
    for path in sorted((out / "chunks").glob("chunk_*.npz")):
        with np.load(path) as data:
            flags.append(bool(data["compiled"]))
    return flags


def test_compiled_sampling_gives_the_eager_samples(loaded, reference, tmp_path, graph_counter):
    """``compile_model`` samples through ``torch.compile``: one graph per batch shape (chunks of
    8 and 4), the eager samples up to float rounding. Each chunk records it; an eager run may
    finish the folder (it is not a setting of the samples), and ``sampling.json`` then says
    "mixed"."""
    counter = graph_counter()
    path = _gen(loaded[0], tmp_path, compile_model=True)
    assert counter.frame_count == 2
    images, eager = _arrays(path).astype(int), _arrays(reference).astype(int)
    assert np.abs(images - eager).max() <= 1 and (images == eager).mean() > 0.99
    assert json.loads((tmp_path / "sampling.json").read_text())["compiled"] is True
    assert _compiled_flags(tmp_path) == [True] * 3
    (tmp_path / "chunks" / "chunk_000001.npz").unlink()
    _gen(loaded[0], tmp_path)
    assert counter.frame_count == 2 and _compiled_flags(tmp_path) == [True, False, True]
    assert json.loads((tmp_path / "sampling.json").read_text())["compiled"] == "mixed"
    _gen(loaded[0], tmp_path, compile_model=True)  # nothing left to sample: the chunks decide
    assert json.loads((tmp_path / "sampling.json").read_text())["compiled"] == "mixed"
    for path in (tmp_path / "chunks").glob("chunk_*.npz"):  # as chunks were written before
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
        np.savez(path, images=images, labels=labels)
    _gen(loaded[0], tmp_path)
    assert json.loads((tmp_path / "sampling.json").read_text())["compiled"] is False


def test_compiled_guided_sampling_has_a_graph_per_batch_shape(loaded, tmp_path, graph_counter):
    """With CFG inside an interval the network sees the chunk (8, then 4) outside it and twice
    the chunk inside: shapes 8, 16, 4 and 8 again, three graphs (torch's default limit is 8);
    compiled without Inductor the samples are the eager ones exactly."""
    counter = graph_counter("eager")
    cfg = _cfg(cfg_scale=1.8, guidance_high=0.7)  # SDE times 1, .68, .36, .04: guided from .68
    compiled = _gen(loaded[0], tmp_path / "compiled", cfg=cfg, compile_model=True)
    assert counter.frame_count == 3
    eager = _gen(loaded[0], tmp_path / "eager", cfg=cfg)
    assert np.array_equal(_arrays(compiled), _arrays(eager))
    assert json.loads((tmp_path / "eager" / "sampling.json").read_text())["compiled"] is False


def test_bad_sources_and_settings_fail_clearly(loaded, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_sampling(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no step_"):
        load_for_sampling(tmp_path)
    with pytest.raises(ValueError, match=r"^mode: .*mode='dopri5' \(need one of \('ode'"):
        SamplingConfig(mode="dopri5")
    with pytest.raises(ValueError, match="cfg_scale"):
        SamplingConfig(mode="meanflow", cfg_scale=1.8)
    with pytest.raises(ValueError, match="guidance_low"):
        SamplingConfig(guidance_low=0.8, guidance_high=0.7)
    with pytest.raises(ConfigError, match=r"^tf32: .*tf32='no' \(need true or false\)"):
        SamplingConfig(tf32="no")
    with pytest.raises(ValueError, match="MeanFlow"):
        _gen(loaded[0], tmp_path, cfg=_cfg(mode="meanflow", num_steps=1))
    with pytest.raises(ValueError, match="latent_shape"):
        generate(
            loaded[0],
            _cfg(),
            tmp_path,
            num_classes=10,
            latent_shape=(3, 8, 8),
            decode=decode_pixels,
            progress=False,
        )


def test_command_line(run_dir, tmp_path, capsys, monkeypatch):
    _reset_accelerate()
    argv = [str(run_dir), "--steps", "2", "--num", "3", "--batch-size", "2", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    path = main([*argv, "--out", str(tmp_path / "cli")])
    assert _arrays(path).shape == (3, 8, 8, 3)
    assert "samples:" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "sampling.json").read_text())["compiled"] is False
    with pytest.raises(SystemExit) as err:
        main([*argv, "--guidance-high", "2"])
    assert err.value.code == 2
    capsys.readouterr()
    # the same folder with another step count: one line naming what differs, nothing sampled
    chunks = sorted((tmp_path / "cli" / "chunks").iterdir())
    with pytest.raises(SystemExit) as err:
        main([*argv[:1], "--steps", "3", *argv[3:], "--out", str(tmp_path / "cli")])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "sampling.num_steps: 2 → 3" in stderr
    assert sorted((tmp_path / "cli" / "chunks").iterdir()) == chunks
    # --compile samples through torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    path = main([*argv, "--compile", "--out", str(tmp_path / "compiled")])
    assert compiled == [{"dynamic": False}] and _arrays(path).shape == (3, 8, 8, 3)
    assert json.loads((tmp_path / "compiled" / "sampling.json").read_text())["compiled"] is True
    # by default compiled where compile_default_on says so (CUDA), unless --no-compile
    import diversedit.generate as gen

    monkeypatch.setattr(gen, "compile_default_on", lambda device: device.type == "cpu")
    main([*argv, "--out", str(tmp_path / "default")])
    main([*argv, "--no-compile", "--out", str(tmp_path / "eager")])
    assert len(compiled) == 2
    for name, want in (("default", True), ("eager", False)):
        assert json.loads((tmp_path / name / "sampling.json").read_text())["compiled"] is want
    capsys.readouterr()
    # --no-tf32 is a setting of the samples, like the step count
    with pytest.raises(SystemExit) as err:
        main([*argv, "--no-tf32", "--out", str(tmp_path / "cli")])
    assert "sampling.tf32: True → False" in capsys.readouterr().err


def test_command_line_missing_source(tmp_path, capsys):
    """``diversedit sample`` of a path that does not exist or holds no checkpoint: one error
    line, exit status 2, nothing written."""
    from diversedit.__main__ import main as cli

    for source, message in (
        (tmp_path / "missing", f"sampling source {tmp_path / 'missing'} does not exist"),
        (tmp_path, f"no step_XXXXXXXX.pt checkpoint in {tmp_path}"),
    ):
        _reset_accelerate()
        with pytest.raises(SystemExit) as err:
            cli(["sample", str(source), "--out", str(tmp_path / "out"), "--no-progress"])
        assert err.value.code == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith(f"error: {message}") and stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())
