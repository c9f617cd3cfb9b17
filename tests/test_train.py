"""The training engine on the digits tier: loss falls, exact resume, preemption, faults."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diversedit.checkpoint import list_checkpoints, load_latest
from diversedit.config import load_config
from diversedit.train import REQUEUE_EXIT_CODE, NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params" / "train"
FAST = {
    "model.depth": 4,
    "model.hidden_size": 32,
    "data.image_size": 8,
    "optim.global_batch": 16,
    "optim.max_steps": 8,
    "checkpoint.every": 2,
    "checkpoint.keep_last": 3,
    "logging.log_every": 2,
    "logging.cka_every": 0,
    "logging.tensorboard": False,
}


def config(tmp_path, params="digits_sit.yaml", **extra):
    return load_config(PARAMS / params, FAST | {"results_dir": str(tmp_path)} | extra)


def trainer(cfg):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # one Accelerator per test in this process
    return Trainer(cfg)


def test_digits_loss_falls(tmp_path):
    extra = {
        "optim.max_steps": 60,
        "optim.lr": 1e-3,
        "logging.log_every": 10,
        "logging.cka_every": 30,
        "logging.tensorboard": True,
    }
    cfg = config(tmp_path, **extra)
    run = trainer(cfg).fit()
    import json

    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [10, 20, 30, 40, 50, 60]
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"]
    assert {"denoise", "grad_norm", "images_per_s"} <= set(logs[0])
    assert (run / "config.json").exists() and (run / "provenance.jsonl").exists()
    prov = json.loads((run / "provenance.jsonl").read_text().splitlines()[0])
    assert len(prov["git_commit"]) == 40 and isinstance(prov["dirty"], bool)
    assert list(run.rglob("events.out.tfevents.*"))  # TensorBoard
    snapshots = sorted((run / "cka").glob("*.npy"))
    assert [p.name for p in snapshots] == ["step_00000030.npy", "step_00000060.npy"]
    sim = np.load(snapshots[-1])
    assert sim.shape == (4, 4) and np.allclose(np.diag(sim), 1)


def test_meanflow_run_records_cka_snapshots(tmp_path):
    """The CKA probe works for MeanFlow models too (probed at r = t)."""
    extra = {"optim.max_steps": 2, "logging.cka_every": 2}
    run = trainer(config(tmp_path, "digits_meanflow.yaml", **extra)).fit()
    sim = np.load(run / "cka" / "step_00000002.npy")
    assert sim.shape == (4, 4) and np.allclose(np.diag(sim), 1)


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            states_equal(a[k], b[k])
        elif isinstance(a[k], list):
            for x, y in zip(a[k], b[k], strict=True):
                states_equal({"_": x}, {"_": y})
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("params", ["digits_sit.yaml", "digits_repa_diversedit.yaml"])
def test_resume_is_bitwise_exact(tmp_path, params):
    once = trainer(config(tmp_path / "a", params)).fit()
    half = trainer(config(tmp_path / "b", params)).fit(4)
    resumed = trainer(config(tmp_path / "b", params))
    assert resumed.step == 4 and resumed.batches_consumed == 4
    two = resumed.fit()
    a, _ = load_latest(once / "checkpoints")
    b, _ = load_latest(two / "checkpoints")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema", "optimizer"):
        states_equal(a[key], b[key])
    assert half == two


def _log(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_log_means_cover_their_steps_and_resume_drops_redone_records(tmp_path):
    """A logged value is the mean over the steps since the last record (a resumed run's first
    window and a run's last one are shorter); records past the resumed checkpoint are dropped."""
    ref = {r["step"]: r["loss"] for r in _log(trainer(config(tmp_path / "a")).fit())}
    assert sorted(ref) == [2, 4, 6, 8]
    ref |= {
        r["step"]: r["loss"]
        for r in _log(trainer(config(tmp_path / "c", **{"logging.log_every": 1})).fit())
    }
    cfg = config(tmp_path / "b", **{"logging.log_every": 3})
    run = trainer(cfg).fit(4)  # checkpoints at 2 and 4; records at 3 and 4 (one step)
    with (run / "log.jsonl").open("a") as f:  # killed after logging step 6, mid-record of 7
        f.write('{"step": 6, "loss": 99.0}\n{"step": 7, "lo')
    run = trainer(cfg).fit()
    logs = _log(run)
    assert [r["step"] for r in logs] == [3, 4, 6, 8]
    mean = lambda *steps: sum(ref[s] for s in steps) / len(steps)  # noqa: E731
    assert logs[0]["loss"] == pytest.approx(mean(1, 2, 3), rel=1e-5)
    assert logs[1]["loss"] == pytest.approx(ref[4], rel=1e-5)  # one step, not a third of it
    assert logs[2]["loss"] == pytest.approx(mean(5, 6), rel=1e-5)
    assert logs[3]["loss"] == pytest.approx(mean(7, 8), rel=1e-5)


def test_signal_while_the_trainer_is_built_exits_for_requeue(tmp_path):
    """SIGUSR1 before the first step (model build, checkpoint loading): exit 85, not 138."""
    script = f"""
import os, signal
from diversedit.config import load_config
from diversedit.train import Trainer, train
real = Trainer.__init__
def init(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGUSR1)
    real(self, *args, **kwargs)
Trainer.__init__ = init
train(load_config({str(PARAMS / "digits_sit.yaml")!r}, {FAST | {"results_dir": str(tmp_path)}!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == REQUEUE_EXIT_CODE, done.stdout + done.stderr
    assert "exiting before training" in done.stdout
    cfg = config(tmp_path)
    assert not list_checkpoints(cfg.run_dir() / "checkpoints")


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    run = trainer(config(tmp_path)).fit()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 6, 8]
    (run / "checkpoints" / "step_00000008.pt").write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        t = trainer(config(tmp_path))
    assert t.step == 6


def test_nan_loss_stops_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    import diversedit.train as train_module

    real = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # step 3
            terms["denoise"] = terms["denoise"] * float("nan")
            terms["loss"] = terms["loss"] * float("nan")
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term\(s\) \['denoise'\]"):
        trainer(config(tmp_path)).fit()
    steps = [s for s, _ in list_checkpoints(config(tmp_path).run_dir() / "checkpoints")]
    assert steps == [2]  # the step-4 checkpoint (NaN weights) was never written
    state, _ = load_latest(config(tmp_path).run_dir() / "checkpoints")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigterm_checkpoints_and_requeues(tmp_path):
    cmd = [
        sys.executable, "-m", "diversedit", "train", str(PARAMS / "digits_sit.yaml"),
        "--set", f"results_dir={tmp_path}", "--set", "optim.max_steps=100000",
        "--set", "checkpoint.every=100000", "--set", "logging.log_every=1",
        "--set", "logging.tensorboard=false", "--set", "model.depth=2",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cfg = load_config(
        PARAMS / "digits_sit.yaml",
        {"results_dir": str(tmp_path), "optim.max_steps": 100000, "checkpoint.every": 100000,
         "logging.log_every": 1, "logging.tensorboard": False, "model.depth": 2},
    )  # fmt: skip
    log = cfg.run_dir() / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    state, _ = load_latest(cfg.run_dir() / "checkpoints")
    assert state["step"] >= 3
    resumed = trainer(cfg)
    assert resumed.step == state["step"]


OPTIONS = {  # option → (overrides, parameter prefix it adds or None, logged term it adds)
    "long_skip": ({"model.long_skip": True}, "skip_linears", None),
    "diversity": ({"objective.diversity.pairs": "star"}, None, "div_orth"),
    "repa": (
        {
            "objective.repa.coeff": 0.5,
            "objective.repa.encoder_depth": 2,
            "encoder.name": "digits-cnn",
        },
        "projectors",
        "repa",
    ),
    "dispersive": ({"objective.dispersive.coeff": 0.25}, None, "dispersive"),
    "sra": (
        {"objective.sra.student_depth": 2, "objective.sra.teacher_depth": 3},
        "sra_head",
        "sra",
    ),
    "meanflow": ({"objective.meanflow.omega": 1.0}, "h_embedder", "meanflow"),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_method_option_reaches_model_and_loss(tmp_path, option, monkeypatch):
    monkeypatch.setenv("DIVERSEDIT_CACHE", str(tmp_path / "cache"))
    overrides, prefix, term = OPTIONS[option]
    base = trainer(config(tmp_path / "off", **{"optim.max_steps": 1}))
    names = {n for n, _ in base.model.named_parameters()}
    t = trainer(config(tmp_path / "on", **({"optim.max_steps": 4} | overrides)))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    run = t.fit()  # 4 steps: adaLN-Zero opens the path to the embedders only at step 3
    if prefix is not None:
        assert not any(n.startswith(prefix) for n in names)  # absent when disabled
        added = [n for n in before if n.startswith(prefix)]
        assert added
        after = dict(t.model.named_parameters())
        assert all(not torch.equal(before[n], after[n]) for n in added)  # trained
    if term is not None:
        assert f'"{term}"' in (run / "log.jsonl").read_text()


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize(
    "params", ["digits_diversedit.yaml", "digits_repa_diversedit.yaml", "digits_meanflow.yaml"]
)
def test_the_loop_reads_tensors_back_only_at_log_and_checkpoint_steps(
    params, tmp_path, monkeypatch
):
    """On a GPU a tensor's value read on the host (``.item()``, ``bool(t)``, ``.cpu()``…) waits
    for the device. The library's code reads none while a step runs, and the loop reads only at
    its log and checkpoint steps; counted here on the CPU as if it were a device (the diversity
    loss's CPU shortcuts off; the data pipeline, whose tensors are host data, not counted)."""
    import diversedit.losses.diversity as div
    from diversedit.train import Trainer

    monkeypatch.setattr(div, "_host_readable", lambda t: False)
    t = trainer(config(tmp_path, params, **{"optim.max_steps": 7, "logging.log_every": 3,
                                            "checkpoint.every": 5}))  # fmt: skip
    lib, data = ROOT / "lib" / "diversedit", ROOT / "lib" / "diversedit" / "data"
    phase, reads = ["built"], []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if caller.is_relative_to(lib) and not caller.is_relative_to(data):
                reads.append((phase[0], t.step, name, f"{caller.name}:{sys._getframe(1).f_lineno}"))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in HOST_READS:
        spy(name)
    micro_step = Trainer._micro_step

    def in_step(self, *args):
        phase[0] = "step"
        try:
            return micro_step(self, *args)
        finally:
            phase[0] = "loop"

    monkeypatch.setattr(Trainer, "_micro_step", in_step)
    t.fit()
    assert t.step == 7
    assert not [r for r in reads if r[0] == "step"], reads
    assert {step for _, step, _, _ in reads} == {3, 5, 6, 7}, reads  # logs 3, 6, 7; saves 5, 7


def test_two_process_ddp_resume_is_exact(tmp_path):
    """DDP across 2 CPU processes (gloo): sharded batches, gathered RNG states, exact resume."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    sets = dict(FAST, **{"model.long_skip": True, "objective.diversity.pairs": "star"})

    def launch(results, steps):
        cmd = [str(torchrun), "--nproc_per_node=2", "-m", "diversedit", "train",
               str(PARAMS / "digits_sit.yaml"), "--max-steps", str(steps)]  # fmt: skip
        for k, v in (sets | {"results_dir": str(results)}).items():
            cmd += ["--set", f"{k}={v}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    launch(tmp_path / "a", 4)
    launch(tmp_path / "b", 2)
    launch(tmp_path / "b", 4)
    cfg_a = load_config(PARAMS / "digits_sit.yaml", sets | {"results_dir": str(tmp_path / "a")})
    cfg_b = load_config(PARAMS / "digits_sit.yaml", sets | {"results_dir": str(tmp_path / "b")})
    a, _ = load_latest(cfg_a.run_dir() / "checkpoints")
    b, _ = load_latest(cfg_b.run_dir() / "checkpoints")
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == 2
    assert not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])  # per-rank seeds
    for key in ("model", "ema", "optimizer"):
        states_equal(a[key], b[key])
    prov = (cfg_b.run_dir() / "provenance.jsonl").read_text().splitlines()
    assert len(prov) == 2 and '"processes": 2' in prov[0]


@pytest.mark.parametrize("signalled", [0, 1])
def test_a_signal_to_one_process_stops_all_at_one_checkpoint(tmp_path, signalled):
    """2 processes started as SLURM's srun does (one per task, rank from the environment):
    SIGTERM to one of them; both checkpoint the same step and exit 85."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sets = FAST | {"results_dir": str(tmp_path), "optim.max_steps": 100000,
                   "checkpoint.every": 100000, "logging.log_every": 1}  # fmt: skip
    cmd = [sys.executable, "-m", "diversedit", "train", str(PARAMS / "digits_sit.yaml")]
    cmd += [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    base = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd,
            env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    log = load_config(PARAMS / "digits_sit.yaml", sets).run_dir() / "log.jsonl"
    deadline = time.time() + 180
    try:
        while not (log.exists() and log.read_text().count("\n") >= 3):
            assert all(p.poll() is None for p in procs), procs[0].stdout.read().decode()
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        procs[signalled].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=90)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [REQUEUE_EXIT_CODE] * 2, outs
    assert "checkpointed step" in outs[0]
    (step, _), *_ = reversed(list_checkpoints(log.parent / "checkpoints"))
    state, _ = load_latest(log.parent / "checkpoints")
    assert state["step"] == step >= 3 and len(state["rng"]) == 2


def test_cli_rejects_bad_params_before_writing(tmp_path, not_a_checkpoint):
    def train(params, *sets):
        sets = [f"results_dir={tmp_path}/r", *sets]
        cmd = [sys.executable, "-m", "diversedit", "train", str(params)]
        cmd += [arg for key in sets for arg in ("--set", key)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    bad = tmp_path / "bad.yaml"
    bad.write_text((PARAMS / "digits_sit.yaml").read_text() + "\nlearning_rate: 1e-3\n")
    done = train(bad)
    assert done.returncode == 2
    assert "bad.yaml" in done.stderr and "learning_rate" in done.stderr
    garbage = tmp_path / "fake.pth"  # encoder weights that exist but are no checkpoint
    garbage.write_bytes(not_a_checkpoint)
    repa = PARAMS / "repa_b2_diversedit.yaml"
    done = train(repa, f"encoder.weights={garbage}", f"data.path={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: {repa} (overrides): encoder.weights: {garbage} is not" in done.stderr
    assert not (tmp_path / "r").exists()


def test_gradient_accumulation_consumes_micro_batches(tmp_path):
    cfg = config(tmp_path, **{"optim.grad_accum": 2, "optim.max_steps": 3})
    t = trainer(cfg)
    assert t.local_batch == 8
    t.fit()
    assert t.step == 3 and t.batches_consumed == 6
    state, _ = load_latest(cfg.run_dir() / "checkpoints")
    assert state["batches_consumed"] == 6


def test_bf16_autocast_run_on_cpu(tmp_path):
    """The mixed-precision path (autocast in the model, fp32 statistics in the losses)."""
    cfg = config(tmp_path, **{"precision.mixed_precision": "bf16", "optim.max_steps": 2},
                 **{"model.long_skip": True, "objective.diversity.pairs": "star"})  # fmt: skip
    t = trainer(cfg)
    assert t.accelerator.mixed_precision == "bf16"
    run = t.fit()
    import json

    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["loss"]) and np.isfinite(record["div"])


def test_compile_setting_reaches_model_and_loss(tmp_path, monkeypatch):
    """precision.compile/compile_mode: the model is compiled with that mode and the diversity
    loss takes its compiled path (torch.compile stubbed: compiling itself is the GPU tier's)."""
    import diversedit.losses.diversity as div

    modes = []

    def fake_compile(fn, **kwargs):
        modes.append(kwargs.get("mode", "default"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    div._compiled_terms.cache_clear()
    extra = {"precision.compile": True, "precision.compile_mode": "max-autotune-no-cudagraphs"}
    tr = trainer(config(tmp_path, "digits_diversedit.yaml", **extra | {"optim.max_steps": 2}))
    tr.fit()
    div._compiled_terms.cache_clear()
    assert tr.compiled and modes == ["max-autotune-no-cudagraphs", "default"]


@pytest.mark.parametrize(
    ("params", "graphs"),
    [
        ("digits_diversedit.yaml", 2),
        ("digits_repa_diversedit.yaml", 2),
        ("digits_meanflow.yaml", 1),
    ],
)
def test_compiled_steps_trace_whole_without_breaks_or_recompiles(
    params, graphs, tmp_path, monkeypatch
):
    """A compiled step is the model as one graph and the diversity loss as another, traced
    through the backward, with no graph break (eager glue a GPU would wait on the host for) and
    no recompilation across steps, log and checkpoint steps among them; traced by TorchDynamo
    and AOTAutograd with Inductor left out (its code generation is the GPU tier's), and
    with the diversity loss's CPU-only host reads off, as on a GPU."""
    from torch._dynamo.utils import counters

    import diversedit.losses.diversity as div

    real = torch.compile

    def traced(fn=None, **kwargs):
        kwargs.pop("mode", None)
        return real(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", traced)
    monkeypatch.setattr(div, "_host_readable", lambda t: False)
    torch._dynamo.reset()
    div._compiled_terms.cache_clear()
    counters.clear()
    tr = trainer(config(tmp_path, params, **{"precision.compile": True, "optim.max_steps": 4}))
    tr.fit()
    div._compiled_terms.cache_clear()
    torch._dynamo.reset()
    assert tr.compiled and tr.step == 4
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def test_block_compile_scope_compiles_each_block_in_place(tmp_path, monkeypatch):
    """precision.compile_scope=blocks: every transformer block is compiled with the configured
    mode (nn.Module.compile stubbed), the model itself is not wrapped, and training runs."""
    compiled = []

    def fake_module_compile(self, *args, **kwargs):
        compiled.append((type(self).__name__, kwargs.get("mode")))

    monkeypatch.setattr(torch.nn.Module, "compile", fake_module_compile)
    extra = {
        "precision.compile": True,
        "precision.compile_scope": "blocks",
        "precision.compile_mode": "max-autotune-no-cudagraphs",
        "optim.max_steps": 2,
    }
    tr = trainer(config(tmp_path, "digits_diversedit.yaml", **extra))
    depth = tr.model.config.depth
    assert compiled == [("SiTBlock", "max-autotune-no-cudagraphs")] * depth
    assert tr.net is tr.model and tr.compiled
    tr.fit()
    assert tr.step == 2


@pytest.mark.triton_interpreted
def test_diversity_triton_trains_like_the_eager_loss(tmp_path, monkeypatch):
    """precision.diversity_triton: the Triton statistics (in Triton's CPU interpreter) give the
    eager loss's logged terms and trained weights; without CUDA or the interpreter the trainer
    refuses before any work."""
    import json

    logs, weights = [], []
    for on in (False, True):
        extra = {"precision.diversity_triton": on, "optim.max_steps": 2}
        tr = trainer(config(tmp_path / str(on), "digits_diversedit.yaml", **extra))
        run = tr.fit()
        logs.append([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()])
        weights.append(tr.model.state_dict())
    (eager,), (got,) = logs
    assert eager["div_mi"] != 0 and eager["div_pairs_used"] > 0
    for key in ("loss", "div_orth", "div_mi", "div_disp", "div_loss", "div_pairs_used"):
        assert got[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-7), key
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=1e-6, rtol=1e-5)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"precision\.diversity_triton: the Triton kernels need"):
        trainer(config(tmp_path / "cpu", "digits_diversedit.yaml", **extra))
    with pytest.raises(ValueError, match=r"precision\.update: the Triton kernels need"):
        trainer(config(tmp_path / "cpu2", **{"precision.update": "triton"}))


@pytest.mark.parametrize(
    ("impl", "accum"),
    [
        ("compiled", 1),
        ("compiled", 2),
        pytest.param("triton", 2, marks=pytest.mark.triton_interpreted),
    ],
)
def test_fused_update_trains_like_the_library_update(tmp_path, monkeypatch, impl, accum):
    """precision.update compiled / triton: clip, AdamW and EMA fused give the library
    sequence's grad norms, weights, EMA and optimiser state (clipping active, weight decay on,
    with and without gradient accumulation); its checkpoints resume with the library update,
    and the other way round (torch.compile stubbed here: tests/test_update.py compiles the
    function; the Triton kernels run in Triton's interpreter)."""
    import json

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or fn)
    extra = {"optim.max_steps": 4, "optim.grad_clip": 0.05, "optim.weight_decay": 0.1,
             "optim.grad_accum": accum}  # fmt: skip
    ref = trainer(config(tmp_path / "ref", **extra))
    ref.fit()
    runs = []
    for first in (True, False):  # 2 steps with the switch then 2 without, and the reverse
        path = tmp_path / str(first)
        choice = {True: impl, False: "library"}
        tr = trainer(config(path, **extra | {"precision.update": choice[first]}))
        assert (tr.update is not None) == first
        tr.fit(2)
        tr = trainer(config(path, **extra | {"precision.update": choice[not first]}))
        assert tr.step == 2
        runs.append(tr.fit())
    assert compiled == ["_foreach_update"] * 2 * (impl == "compiled")
    want = [json.loads(line) for line in (ref.run_dir / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0.05 for r in want)  # the clipping is active
    a, _ = load_latest(ref.run_dir / "checkpoints")
    for run in runs:
        got = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        for g, w in zip(got, want, strict=True):
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), g["step"]
        b, _ = load_latest(run / "checkpoints")
        for key in ("model", "ema"):
            for name, value in a[key].items():
                torch.testing.assert_close(b[key][name], value, atol=1e-5, rtol=1e-4)
        for i, state in a["optimizer"]["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(b["optimizer"]["state"][i][name], value,
                                           atol=1e-7, rtol=1e-4)  # fmt: skip


def test_resume_may_change_how_a_run_executes_not_what_it_trains(tmp_path, capsys):
    """Settings left out of the run hash (logging, compilation...) may differ on resume and are
    recorded per start; a hashed value that differs from the run's config.json is refused.
    Resuming and finding the run finished are said on stdout."""
    import json

    run = trainer(config(tmp_path, **{"optim.max_steps": 4})).fit(2)
    assert str(run) not in capsys.readouterr().out  # a fresh start says nothing
    tr = trainer(config(tmp_path, **{"optim.max_steps": 4, "logging.log_every": 1}))
    assert tr.step == 2
    tr.fit()
    assert f"resuming {run} from step 2\n" in capsys.readouterr().out
    starts = [json.loads(line) for line in (run / "provenance.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 2]
    assert all(s["precision"]["mixed_precision"] == "no" for s in starts)
    # the null defaults as they resolved here: nothing compiled, no Triton kernels on the CPU
    cpu = {"compile": False, "diversity_triton": False, "update": "library"}
    assert all(s["execution"] == cpu for s in starts)
    saved = json.loads((run / "config.json").read_text())
    del saved["precision"]["update"]  # as versions without that setting wrote it
    (run / "config.json").write_text(json.dumps(saved))
    assert trainer(config(tmp_path, **{"optim.max_steps": 4})).fit() == run
    assert f"{run} already finished at step 4; nothing to do\n" in capsys.readouterr().out
    # a changed hashed value is a new run: the start names its siblings and the difference
    fresh = {"optim.max_steps": 6, "checkpoint.continue_shorter": False}
    other = trainer(config(tmp_path, **fresh)).fit(1)
    out = capsys.readouterr().out
    named = f"new run {other.name}; other runs named 'digits-sit':\n"
    assert named + f"  {run.name} differs in optim.max_steps: 4 → 6\n" in out
    assert "resume it with --max-steps N" in out
    saved["seed"] = 1
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(RuntimeError, match=r"differs from this run's configuration: seed: 1 → 0"):
        trainer(config(tmp_path, **{"optim.max_steps": 4})).fit()


def test_a_longer_run_continues_a_shorter_one_exactly(tmp_path, capsys):
    """Runs that differ only in optim.max_steps share a trajectory: a new run starts from the
    newest checkpoint within its budget of such a run, and ends bitwise where a run from scratch
    ends. Another configuration, or continue_shorter off, starts from scratch."""
    short = trainer(config(tmp_path / "r", **{"optim.max_steps": 4})).fit()
    capsys.readouterr()
    longer = trainer(config(tmp_path / "r", **{"optim.max_steps": 7}))
    assert longer.step == 4 and longer._resumed_from.parents[1] == short
    run = longer.fit()
    assert f"from step 4 of {short.name} (the configurations differ" in capsys.readouterr().out
    behind = {"optim.max_steps": 9}
    trainer(config(tmp_path / "r", **behind, **{"checkpoint.continue_shorter": False})).fit(2)
    jumped = trainer(config(tmp_path / "r", **behind))  # its own checkpoint is at step 2
    assert jumped.step == 7 and jumped._resumed_from.parents[1] == run
    three = trainer(config(tmp_path / "r", **{"optim.max_steps": 3}))
    assert three.step == 2  # the newest checkpoint within its budget (4 is beyond it)
    done = trainer(config(tmp_path / "r", **{"optim.max_steps": 6}))
    assert done.step == 6  # nothing left to train, but the run gets its own checkpoint to sample
    assert [s for s, _ in list_checkpoints(done.fit() / "checkpoints")] == [6]
    scratch = trainer(config(tmp_path / "s", **{"optim.max_steps": 7})).fit()
    a, _ = load_latest(run / "checkpoints")
    b, _ = load_latest(scratch / "checkpoints")
    assert a["step"] == b["step"] == 7
    for key in ("model", "ema", "optimizer"):
        states_equal(a[key], b[key])
    other = {"optim.max_steps": 9, "optim.lr": 2e-4}
    assert trainer(config(tmp_path / "r", **other)).step == 0
    off = {"optim.max_steps": 11, "checkpoint.continue_shorter": False}
    assert trainer(config(tmp_path / "r", **off)).step == 0


def test_batch_must_fit_the_data_and_split_over_the_processes(tmp_path, monkeypatch):
    """Checked with the params, before anything is written (not when the loop starts)."""
    from diversedit.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.global_batch: 5000 is more than the 1,797"):
        config(tmp_path, **{"optim.global_batch": 5000})
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"16 is not divisible by 3 processes \(WORLD_SIZE\)"):
        config(tmp_path)
    assert not any(tmp_path.iterdir())
