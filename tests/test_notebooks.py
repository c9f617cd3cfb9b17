"""Notebooks, row params and the papermill batch runner.

(a) every notebook and row file validates; the checks themselves catch bad files;
(b) the runner on a fake table: failing, silent and good rows, skip-if-done, --force, rows in
    parallel; the order and waits of parallel rows;
(c) the real smoke suite: every notebook, every smoke row, under papermill (minutes).
"""

import json
import math
import os
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from diversedit.pipeline import CKA_RUNS, ROW_PARAMETERS
from diversedit.results import load_published
from diversedit.runner import (
    REPO_ROOT,
    default_jobs,
    discover,
    ensure_kernel,
    main,
    notebook_problems,
    notebook_stems,
    read_row_file,
    reproduce,
    row_configs,
    run_order,
    run_waves,
    validate_params,
)

STEMS = notebook_stems()

# --------------------------------------------------------------------------- (a) validation


def test_every_notebook_and_row_file_validates():
    assert STEMS == [
        "f01_cka",
        "t01_model_scales",
        "t02_sota_cfg",
        "t03_component_ablation",
        "t04_loss_terms",
        "t05_adaptive_range",
        "t06_meanflow_one_step",
        "t07_complementarity",
    ]
    assert validate_params() == []


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_has_one_parameters_cell_and_no_shell_escapes(stem):
    path = REPO_ROOT / "notebooks" / f"{stem}.py"
    assert notebook_problems(path) == []
    text = path.read_text()
    assert text.count('# %% tags=["parameters"]') == 1
    assert not [line for line in text.splitlines() if line.lstrip().startswith("!")]


@pytest.mark.parametrize("stem", [s for s in STEMS if s.startswith("t")])
def test_row_files_cover_the_published_rows(stem):
    """One smoke and one paper file per reproducible published row (references excluded)."""
    published = load_published(stem)
    wanted = {r["row"] for r in published["rows"] if r["kind"] == "reproduce"}
    for tier in ("smoke", "paper"):
        files = {p.stem for p in (REPO_ROOT / "params" / stem / tier).glob("*.yaml")}
        assert files == wanted, tier
    notebook = (REPO_ROOT / "notebooks" / f"{stem}.py").read_text()
    assert all(f"\n{name}: " in notebook for name in ROW_PARAMETERS)


def _run_dirs(stem: str, tier: str, row: str) -> list[str]:
    """The run directories a row trains or reuses (row files hold every parameter but
    results_dir)."""
    values = read_row_file(REPO_ROOT / "params" / stem / tier / f"{row}.yaml")
    return [str(c.run_dir()) for c in row_configs({"results_dir": "results"} | values)]


@pytest.mark.parametrize("tier", ["smoke", "paper"])
def test_rows_shared_between_tables_are_one_run(tier):
    def run(stem: str, row: str) -> str:
        return _run_dirs(stem, tier, row)[0]

    ours = {
        run("t01_model_scales", "sit-b-ours"),
        run("t03_component_ablation", "sit-b-full"),
        run("t05_adaptive_range", "range-0.1-0.5"),
    }
    assert len(ours) == 1
    sit = {run(s, "sit-b") for s in STEMS if s[:3] in ("t01", "t03", "t05", "t07")}
    repa = {run(s, "repa-b") for s in STEMS if s[:3] in ("t01", "t03", "t04", "t07")}
    assert len(sit) == 1 and len(repa) == 1
    assert run("t04_loss_terms", "full") == run("t01_model_scales", "repa-b-ours")
    assert run("t02_sota_cfg", "diversedit-80ep") == run("t01_model_scales", "repa-xl-ours")
    assert run("t02_sota_cfg", "diversedit-200ep") != run("t01_model_scales", "repa-xl-ours")
    assert _run_dirs("f01_cka", tier, "cka") == [*sit, *repa, *ours]
    assert len(sit | repa | ours) == 3


def test_waves_never_train_one_run_twice_at_once():
    """Rows of one wave train disjoint runs; a wave-2 row trains no run that a wave-1 row trains,
    and only a run of its own that continues a shorter wave-1 run (t02's 200 epochs)."""
    waves = run_waves(discover(None, "paper"))
    dirs = {(r.table, r.row): set(_run_dirs(r.stem, "paper", r.row)) for r, _ in waves}
    first = [dirs[(r.table, r.row)] for r, w in waves if w == 1]
    assert sum(len(d) for d in first) == len(set().union(*first))  # pairwise disjoint
    trained = set().union(*first)
    later = {(r.table, r.row): dirs[(r.table, r.row)] - trained for r, w in waves if w == 2}
    # Table 2's 200-epoch runs continue Table 1's 400K-step REPA-XL/2 (+ Ours) runs
    assert {k for k, new in later.items() if new} == {("t02", "diversedit-200ep"), ("t02", "repa")}
    news = [new for new in later.values() if new]
    assert sum(len(n) for n in news) == len(set().union(*news))
    assert {w for r, w in waves if r.table == "t02" and r.row == "diversedit-80ep"} == {2}


@pytest.mark.parametrize("tier", ["smoke", "paper"])
def test_parallel_rows_wait_for_the_rows_they_share_a_run_with(tier):
    """Rows that share a run never run at once (one waits for the other, whichever trains it);
    a row whose run continues a shorter run on its trajectory waits for that run's rows."""
    order, after = run_order(discover(None, tier))
    assert len(order) == len(set(order)) == len(discover(None, tier)) == len(after)
    assert all(j < i for i, a in enumerate(after) for j in a)  # only earlier rows
    dirs = [set(_run_dirs(r.stem, tier, r.row)) for r in order]
    for i in range(len(order)):
        for j in range(i):
            assert (j in after[i]) >= bool(dirs[i] & dirs[j]), (order[i], order[j])
    index = {(r.table, r.row): i for i, r in enumerate(order)}
    for row in ("diversedit-200ep", "repa"):  # continue Table 1's 400K-step XL/2 runs
        first = ("t01", "repa-xl-ours" if row == "diversedit-200ep" else "repa-xl")
        assert index[first] in after[index[("t02", row)]]
    assert index[("t02", "diversedit-200ep")] not in after[index[("t02", "diversedit-80ep")]]
    independent = [i for i, a in enumerate(after) if not a]
    assert len(independent) > len(order) // 2  # most rows may start at once


def test_paper_rows_use_the_paper_protocol():
    for stem in STEMS:
        for path in (REPO_ROOT / "params" / stem / "paper").glob("*.yaml"):
            v = read_row_file(path)
            if stem.startswith("f"):
                continue
            assert v["num_samples"] == 50_000 and v["extractor"] == "inception", path
            assert v["reference"] == "data/VIRTUAL_imagenet256_labeled.npz", path
            steps = 1 if v["sampler"] == "meanflow" else 250
            assert v["sampler_steps"] == steps, path
            cfg = (1.8, 0.7) if stem.startswith("t02") else (1.0, 1.0)
            assert (v["cfg_scale"], v["guidance_high"]) == cfg, path
            assert not v["train"].startswith("params/train/digits"), path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_validation_catches_bad_notebooks_and_row_files(tmp_path):
    stem = "t01_model_scales"
    source = (REPO_ROOT / "notebooks" / f"{stem}.py").read_text()
    _write(tmp_path / "notebooks" / f"{stem}.py", source + "\n# %%\n!ls\n")
    _write(
        tmp_path / "notebooks" / "t02_broken.py",
        source.replace('overrides: str = ""', 'overrides: str = "a=1"'),
    )
    good = read_row_file(REPO_ROOT / "params" / stem / "smoke" / "sit-b.yaml")
    good["train"] = str(REPO_ROOT / good["train"])
    rows = tmp_path / "params" / stem / "smoke"
    cases = {
        "sit-b": {},
        "unknown-key": {"row": "unknown-key", "learning_rate": 1.0},
        "wrong-slug": {"row": "another-slug"},
        "float-trap": {"row": "float-trap", "cfg_scale": "1e-4"},
        "bad-override": {"row": "bad-override", "overrides": "optim.lr=0"},
        "bad-extractor": {"row": "bad-extractor", "extractor": "dinov2"},
    }
    for name, change in cases.items():
        _write(rows / f"{name}.yaml", yaml.safe_dump(good | {"label": name} | change))
    _write(tmp_path / "params" / stem / "huge" / "x.yaml", yaml.safe_dump(good))
    problems = "\n".join(validate_params(tmp_path))
    assert "shell escape '!ls'" in problems
    assert "t02_broken.py: parameters are neither" in problems and "'overrides'" in problems
    assert "params/t02_broken: no smoke row files" not in problems  # notebook already failed
    assert "unknown-key.yaml: 'learning_rate' is not a parameter" in problems
    assert "wrong-slug.yaml: row is 'another-slug', expected 'wrong-slug'" in problems
    assert "float-trap.yaml: cfg_scale: '1e-4' is not a number" in problems
    assert "bad-override.yaml" in problems and "optim.lr" in problems
    assert "bad-extractor.yaml" in problems and "extractor" in problems
    assert "huge: not a tier" in problems
    assert "sit-b.yaml" not in problems


def test_reproduce_checks_the_rows_to_run_before_running_any(tmp_path, capsys):
    """Bad sampler settings, a misspelled key, missing weights or reference files and shared
    labels stop ``reproduce`` before any row runs (``--validate`` names the first and last)."""
    stem = "t01_model_scales"
    _write(
        tmp_path / "notebooks" / f"{stem}.py", (REPO_ROOT / "notebooks" / f"{stem}.py").read_text()
    )
    good = read_row_file(REPO_ROOT / "params" / stem / "smoke" / "sit-b.yaml")
    good["train"] = str(REPO_ROOT / good["train"])
    rows = tmp_path / "params" / stem / "smoke"
    cases = {
        "sit-b": {},
        "rk4": {"sampler": "rk4"},
        "typo": {"sampler_stpes": 10},
        "no-weights": {"extractor": "inception", "inception_weights": str(tmp_path / "no.pth")},
        "no-reference": {"reference": str(tmp_path / "VIRTUAL_missing.npz")},
        "copy-a": {"label": "same label"},
        "copy-b": {"label": "same label"},
    }
    for name, change in cases.items():
        _write(rows / f"{name}.yaml", yaml.safe_dump(good | {"row": name, "label": name} | change))
    results = tmp_path / "results"
    args = dict(results_dir=results, root=tmp_path, kernel="no-such-kernel")
    with pytest.raises(ValueError, match="nothing was run") as err:
        reproduce(None, "smoke", **args)
    text = str(err.value)
    assert "rk4.yaml" in text and "sampler: invalid" in text and "'rk4'" in text
    assert "typo.yaml: 'sampler_stpes' is not a parameter" in text
    assert "no-weights.yaml" in text and "inception_weights: Inception weights not found" in text
    assert "no-reference.yaml" in text and "VIRTUAL_missing.npz does not exist" in text
    assert "copy-b.yaml: label 'same label' is also the label of copy-a.yaml" in text
    assert "sit-b.yaml" not in text and not results.exists()  # nothing ran, nothing written
    with pytest.raises(ValueError) as err:  # only the rows to run are checked
        reproduce(None, "smoke", rows=["rk4", "copy-a"], **args)
    assert "rk4.yaml" in str(err.value) and "copy-b.yaml" in str(err.value)
    assert "typo.yaml" not in str(err.value)
    # a good row passes the check and reaches the kernel (which does not exist here)
    assert reproduce(None, "smoke", rows=["sit-b"], **args) == 1
    assert "no-such-kernel" in _statuses(results)["sit-b"]["error"].lower()
    problems = "\n".join(validate_params(tmp_path))
    assert "rk4.yaml: sampler: invalid" in problems and "'same label'" in problems
    assert main(["t01", "--results", str(results)], root=tmp_path) == 2
    assert "nothing was run" in capsys.readouterr().err


@pytest.mark.parametrize("stem", STEMS)
def test_first_cell_runs_from_the_notebooks_folder(stem, monkeypatch, capsys):
    """JupyterLab starts a notebook's kernel in ``notebooks/``: the parameters cell and the
    first code cell (validation only, no training) still find the repository's files."""
    import os

    import jupytext

    cells = [c for c in jupytext.read(REPO_ROOT / "notebooks" / f"{stem}.py").cells
             if c.cell_type == "code"]  # fmt: skip
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    namespace: dict = {}
    for cell in cells[:2]:  # the parameters, then setup and validation
        exec(compile(cell.source, f"{stem}.py", "exec"), namespace)
    assert Path(os.getcwd()) == REPO_ROOT
    assert "working directory:" in capsys.readouterr().out


def test_use_repository_root_outside_a_checkout(tmp_path, monkeypatch):
    from diversedit.files import use_repository_root

    monkeypatch.chdir(tmp_path)
    assert use_repository_root() == tmp_path.resolve() and Path.cwd() == tmp_path.resolve()
    monkeypatch.chdir(REPO_ROOT)
    assert use_repository_root() == REPO_ROOT
    report = (REPO_ROOT / "notebooks" / "report.py").read_text()
    assert report.index("use_repository_root()") < report.index("load_report_data(")


def test_notebook_problems_counts_parameters_cells(tmp_path):
    text = '# %% tags=["parameters"]\nx: int = 1\n\n# %% tags=["parameters"]\ny: int = 2\n'
    path = _write(tmp_path / "nb.py", text)
    problems = notebook_problems(path)
    assert any("2 cells tagged 'parameters'" in p for p in problems)
    assert any("kernelspec name None" in p for p in problems)


# --------------------------------------------------------------------------- (b) fake table

FAKE_NOTEBOOK = """\
# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["parameters"]
table: str = "t98"  # table id
row: str = "good"  # row slug
tier: str = "smoke"  # tier
mode: str = "ok"  # ok | raise | exit | die | diverge | slow | kill | beside (outlives kill)
wait_for: str = ""  # a row that must start before this one ends (within 60 s)
results_dir: str = "results"  # results root

# %%
import json
import os
import pathlib
import signal
import sys
import time

started = time.time()
flags = pathlib.Path(results_dir, "started")
flags.mkdir(parents=True, exist_ok=True)
(flags / row).touch()
while wait_for and not (flags / wait_for).exists():
    assert time.time() < started + 60, f"{wait_for} never started while {row} ran"
    time.sleep(0.05)
killed = pathlib.Path(results_dir, "killed")
if mode == "kill":  # kill the runner's worker process that runs this row (never anything else)
    if "spawn_main" in pathlib.Path(f"/proc/{os.getppid()}/cmdline").read_text():
        pathlib.Path(f"{killed}.tmp").write_text(str(os.getppid()))
        os.replace(f"{killed}.tmp", killed)  # whole: a reader never sees an empty pid
        os.kill(os.getppid(), signal.SIGKILL)
    os._exit(1)


def dead(pid: str) -> bool:  # gone, or a zombie waiting for the runner to notice
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"


while mode == "beside" and not (killed.exists() and dead(killed.read_text())):
    assert time.time() < started + 60, "the worker beside this row was not killed"
    time.sleep(0.05)
if mode == "beside":
    time.sleep(5.0)  # still running when the runner notices the dead worker
if mode == "slow":
    time.sleep(1.0)
if mode == "raise":
    raise RuntimeError("boom from the fake notebook")
if mode == "exit":
    sys.exit(0)  # papermill counts this as success
if mode == "die":
    os._exit(1)  # the kernel dies
out = pathlib.Path(results_dir, table, tier, row)
out.mkdir(parents=True, exist_ok=True)
result = {"status": "diverged"} if mode == "diverge" else {"FD_digits": 1.0}
gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
stamps = {"started": started, "ended": time.time()}
(out / "metrics.json").write_text(json.dumps(result | {"cwd": os.getcwd(), "gpus": gpus} | stamps))
"""


@pytest.fixture()
def fake_root(tmp_path):
    root = tmp_path / "repo"
    _write(root / "notebooks" / "t98_fake.py", FAKE_NOTEBOOK)
    _write(root / "notebooks" / "report.py", "# not a table notebook\n")
    for row, mode in {"good": "ok", "bad": "raise", "silent": "exit", "dead": "die"}.items():
        values = {"table": "t98", "row": row, "tier": "smoke", "mode": mode}
        _write(root / "params" / "t98_fake" / "smoke" / f"{row}.yaml", yaml.safe_dump(values))
    return root


def _statuses(results: Path) -> dict[str, dict]:
    doc = json.loads((results / "smoke-runs.json").read_text())
    return {e["row"]: e for e in doc["rows"]}


def test_runner_isolates_failures_and_skips_done_rows(fake_root, tmp_path, capfd):
    results = tmp_path / "results"
    code = reproduce(None, "smoke", results_dir=results, root=fake_root, kernel="python3")
    assert code == 1
    good = results / "t98" / "smoke" / "good" / "metrics.json"
    assert json.loads(good.read_text())["cwd"] == str(fake_root)  # kernels run in the root
    assert (results / "t98" / "smoke" / "good" / "notebook.ipynb").is_file()
    runs = _statuses(results)
    assert {r: e["status"] for r, e in runs.items()} == {
        "good": "done",
        "bad": "failed",
        "silent": "failed",
        "dead": "failed",
    }
    assert "RuntimeError: boom from the fake notebook" in runs["bad"]["error"]
    assert "without writing" in runs["silent"]["error"]
    assert "Dead" in runs["dead"]["error"] or "died" in runs["dead"]["error"].lower()
    out, err = capfd.readouterr()  # the kernels' own output included (file descriptors)
    assert "t98/bad" in out and "failed" in out
    assert re.search(r"\n1/4 rows done in \d+ s \(\d+ s of rows\)\n", out)  # wall clock, sum
    assert "without encryption" not in out + err  # no kernel-app warnings on the terminal

    stamp = good.stat().st_mtime_ns
    assert reproduce(["t98"], "smoke", results_dir=results, root=fake_root, kernel="python3") == 1
    assert _statuses(results)["good"]["status"] == "skipped"
    assert good.stat().st_mtime_ns == stamp

    args = dict(results_dir=results, root=fake_root, kernel="python3", rows=["good"])
    assert reproduce(["t98_fake"], "smoke", **args) == 0  # skipped counts as done
    assert reproduce(["t98_fake"], "smoke", force=True, **args) == 0
    assert good.stat().st_mtime_ns != stamp
    assert _statuses(results)["good"]["status"] == "done"

    stale = results / "t98" / "smoke" / "bad" / "metrics.json"
    stale.write_text("{}")  # e.g. left by an earlier run: --force must not count it
    args["rows"] = ["bad"]
    assert reproduce(["t98"], "smoke", force=True, **args) == 1
    assert not stale.exists() and _statuses(results)["bad"]["status"] == "failed"


def test_runner_reports_diverged_rows_as_results(fake_root, tmp_path, capsys):
    """A row whose run diverged wrote its result: 'diverged' in the summary, not a failure."""
    values = {"table": "t98", "row": "nan", "tier": "smoke", "mode": "diverge"}
    _write(fake_root / "params" / "t98_fake" / "smoke" / "nan.yaml", yaml.safe_dump(values))
    args = dict(results_dir=tmp_path, root=fake_root, kernel="python3", rows=["nan"])
    assert reproduce(["t98"], "smoke", **args) == 0
    assert _statuses(tmp_path)["nan"]["status"] == "diverged"
    assert "diverged" in capsys.readouterr().out


def _fake_rows(root: Path, modes: dict[str, str | dict[str, str]]) -> None:
    """Params files of fake rows: a mode each, or a dict of the fake notebook's parameters."""
    for row, mode in modes.items():
        values = {"table": "t98", "row": row, "tier": "smoke"}
        values |= mode if isinstance(mode, dict) else {"mode": mode}
        _write(root / "params" / "t98_fake" / "smoke" / f"{row}.yaml", yaml.safe_dump(values))


def test_runner_runs_rows_in_parallel_processes(fake_root, tmp_path, capsys, monkeypatch):
    """With jobs=2 two rows run at once (each waits until the other has started: one at a time
    they would time out), each worker on its own GPU; the summary keeps the rows' order; a
    failing row stays one row's failure."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    meet = {"meet-a": {"wait_for": "meet-b"}, "meet-b": {"wait_for": "meet-a"}}
    _fake_rows(fake_root, meet)
    args = dict(results_dir=tmp_path, root=fake_root, kernel="python3", jobs=2)
    assert reproduce(["t98"], "smoke", rows=["meet-b", "bad", "meet-a"], **args) == 1
    runs = _statuses(tmp_path)
    assert {r: e["status"] for r, e in runs.items()} == {
        "meet-a": "done",
        "meet-b": "done",
        "bad": "failed",
    }
    assert "boom from the fake notebook" in runs["bad"]["error"]
    gpus = {json.loads((tmp_path / "t98" / "smoke" / r / "metrics.json").read_text())["gpus"]
            for r in ("meet-a", "meet-b")}  # fmt: skip
    assert gpus == {"3", "5"}
    out = capsys.readouterr().out
    assert "2 rows at a time, on GPUs 3,5" in out
    summary = out[out.index("table/row") :]
    assert summary.index("t98/bad") < summary.index("t98/meet-a") < summary.index("t98/meet-b")
    with pytest.raises(ValueError, match="jobs"):
        reproduce(["t98"], "smoke", **args | {"jobs": 0})


def test_parallel_rows_that_share_a_run_never_overlap(fake_root, tmp_path, monkeypatch):
    """reproduce follows run_order: with three workers, the row that shares a run with the first
    starts after it has ended, while an unrelated row runs beside the first (the first waits
    until it has started: one at a time, it would fail)."""
    from diversedit import runner

    _fake_rows(fake_root, {"s-first": {"wait_for": "s-other"}, "s-other": "ok", "s-shares": "ok"})
    runs = {"s-first": {"runs/a": ("A", 1)}, "s-other": {"runs/b": ("B", 1)}}
    runs["s-shares"] = runs["s-first"]
    monkeypatch.setattr(runner, "row_runs", lambda rows: [runs[r.row] for r in rows])
    args = dict(results_dir=tmp_path, root=fake_root, kernel="python3", jobs=3)
    assert reproduce(["t98"], "smoke", rows=list(runs), **args) == 0
    stamps = {
        row: json.loads((tmp_path / "t98" / "smoke" / row / "metrics.json").read_text())
        for row in runs
    }
    assert stamps["s-shares"]["started"] >= stamps["s-first"]["ended"]
    assert stamps["s-other"]["started"] < stamps["s-first"]["ended"]


def test_a_dead_worker_fails_its_rows_not_the_batch(fake_root, tmp_path):
    """A worker process killed mid-row (the out-of-memory killer, say): that row fails, later
    rows run in a fresh pool, and rows already done stay skipped."""
    modes = {"k1-kill": "kill", "k2-beside": "beside", "k3-next": "ok", "k4-last": "slow"}
    _fake_rows(fake_root, modes)  # k2 runs beside k1 (and may fail with it), k3 and k4 after
    args = dict(results_dir=tmp_path, root=fake_root, kernel="python3")
    assert reproduce(["t98"], "smoke", rows=["good"], **args) == 0
    assert reproduce(["t98"], "smoke", rows=["good", *modes], jobs=2, **args) == 1
    runs = _statuses(tmp_path)
    assert runs["good"]["status"] == "skipped"
    assert runs["k1-kill"]["status"] == "failed"
    assert "BrokenProcessPool" in runs["k1-kill"]["error"]
    assert runs["k3-next"]["status"] == runs["k4-last"]["status"] == "done"


def test_scheduler_waits_limits_and_survives_a_failed_start():
    """Items start after the items they wait for, at most ``jobs`` at once, the others in order;
    an item that cannot start (e.g. a broken process pool) fails alone."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from diversedit.runner import _scheduled

    after = [set(), set(), {0}, set(), {2, 3}]
    lock, running, peak, log = threading.Lock(), [0], [0], []

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            log.append(("start", i))
        threading.Event().wait(0.01)
        with lock:
            running[0] -= 1
            log.append(("end", i))
        return i * 10

    with ThreadPoolExecutor(4) as pool:

        def start(i: int):
            if i == 3:
                raise RuntimeError("cannot start 3")
            return pool.submit(work, i)

        got = {i: f for i, f in _scheduled(after, 2, start)}
    assert sorted(got) == [0, 1, 2, 3, 4] and peak[0] <= 2
    assert [got[i].result() for i in (0, 1, 2, 4)] == [0, 10, 20, 40]
    assert "cannot start 3" in str(got[3].exception())
    for i, waits in enumerate(after):
        for j in waits - {3}:
            assert log.index(("end", j)) < log.index(("start", i))
    assert [i for kind, i in log if kind == "start"][:2] == [0, 1]


def test_scheduler_queues_an_item_again_once_asked():
    """``again`` sends a finished item back to wait its turn: it starts twice, is yielded once,
    and the items that wait for it wait for its second run."""
    from concurrent.futures import Future

    from diversedit.runner import _scheduled

    starts = []

    def start(i: int) -> Future:
        starts.append(i)
        future: Future = Future()
        future.set_result(starts.count(i))  # which run of item i this is
        return future

    def again(i: int, future: Future) -> bool:
        return i == 1 and future.result() == 1

    got = list(_scheduled([set(), set(), {1}], 1, start, again))
    assert starts == [0, 1, 1, 2]
    assert [(i, f.result()) for i, f in got] == [(0, 1), (1, 2), (2, 1)]


def test_workers_tell_calls_a_broken_pool_never_started():
    """One worker: the first call kills it after being taken up, the second was still queued.
    Both fail with BrokenProcessPool, only the second never started; the next call runs in a
    fresh pool."""
    from concurrent.futures.process import BrokenProcessPool

    from diversedit.runner import _Workers

    with _Workers(1) as pool:
        dies, queued = pool.submit(os._exit, 3), pool.submit(abs, -2)
        for future in (dies, queued):
            assert isinstance(future.exception(timeout=60), BrokenProcessPool)
        assert not pool.never_started(dies) and pool.never_started(queued)
        after = pool.submit(abs, -5)
        assert after.result(timeout=60) == 5 and not pool.never_started(after)
        flags = pool.flags
    assert not flags.exists()  # removed with the pool


def test_reproduce_queues_a_row_its_broken_pool_never_started_once(
    fake_root, tmp_path, capsys, monkeypatch
):
    """A row whose call failed with BrokenProcessPool before any worker took it up runs again
    (once) and counts as done; a row that fails that way twice stays failed."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from diversedit import runner

    class Flaky(runner._InlineExecutor):
        """Fails a row's first ``breaks[row]`` calls as a pool that broke before starting them."""

        def __init__(self, breaks: dict[str, int]) -> None:
            self.breaks, self.unstarted = breaks, set()

        def submit(self, fn, /, row, *args, **kwargs):
            if self.breaks.get(row.row, 0) > 0:
                self.breaks[row.row] -= 1
                future: Future = Future()
                future.set_exception(BrokenProcessPool("pool broke"))
                self.unstarted.add(future)
                return future
            return super().submit(fn, row, *args, **kwargs)

        def never_started(self, future):
            return future in self.unstarted

    executor = Flaky({"r-once": 1, "r-twice": 2})
    monkeypatch.setattr(runner, "_executor", lambda jobs, gpus: executor)
    _fake_rows(fake_root, {"r-once": "ok", "r-twice": "ok"})
    args = dict(results_dir=tmp_path, root=fake_root, kernel="python3", jobs=2)
    assert reproduce(["t98"], "smoke", rows=["r-once", "r-twice"], **args) == 1
    runs = _statuses(tmp_path)
    assert runs["r-once"]["status"] == "done"
    assert runs["r-twice"]["status"] == "failed" and "pool broke" in runs["r-twice"]["error"]
    out = capsys.readouterr().out
    assert out.count("not started before a worker died; queued again") == 2


def test_worker_gpus(monkeypatch):
    from diversedit.runner import worker_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 1,2")
    assert worker_gpus(4) == ["0", "1", "2", "0"] and worker_gpus(2) == ["0", "1"]
    for one in ("7", "", "GPU-5a1e"):  # one GPU or none: nothing to share out
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", one)
        assert worker_gpus(3) == []


def test_default_jobs(monkeypatch):
    from diversedit import runner

    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert runner.default_jobs("smoke") == runner.MAX_SMOKE_JOBS
    assert runner.default_jobs("paper") == 1
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runner.default_jobs("smoke") == 2
    given = []  # the command line runs rows in parallel unless told otherwise
    monkeypatch.setattr(runner, "reproduce", lambda *a, **kw: given.append(kw["jobs"]) or 0)
    for argv in (["t98"], ["t98", "--tier", "paper"], ["t98", "--jobs", "3"]):
        assert runner.main(argv) == 0
    assert given == [2, 1, 3]


def test_runner_rejects_unknown_tables_and_rows(fake_root, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown table"):
        discover(["t42"], "smoke", root=fake_root)
    with pytest.raises(ValueError, match="nope"):
        discover(None, "smoke", rows=["nope"], root=fake_root)
    assert [r.row for r in discover(["t98"], "smoke", root=fake_root)] == [
        "bad",
        "dead",
        "good",
        "silent",
    ]
    assert main(["t42", "--results", str(tmp_path)], root=fake_root) == 2
    assert "unknown table" in capsys.readouterr().err
    argv = ["t98", "--rows", "good,bad", "--results", str(tmp_path), "--kernel", "python3"]
    assert main(argv, root=fake_root) == 1
    assert set(_statuses(tmp_path)) == {"good", "bad"}


def test_ensure_kernel_registers_this_interpreter():
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    assert ensure_kernel() == "diversedit"
    spec = KernelSpecManager().get_kernel_spec("diversedit")
    assert Path(spec.argv[0]).absolute() == Path(sys.executable).absolute()


# --------------------------------------------------------------------------- (c) smoke suite


@pytest.mark.notebooks
def test_smoke_suite_runs_every_notebook(tmp_path):
    """Every notebook × every smoke row under papermill: all done, finite digits metrics."""
    code = reproduce(None, "smoke", results_dir=tmp_path, jobs=default_jobs("smoke"))
    rows = discover(None, "smoke")
    statuses = _statuses(tmp_path)
    assert code == 0, {r: e["error"] for r, e in statuses.items() if e["status"] == "failed"}
    assert {r.table for r in rows} == {s[:3] for s in STEMS}
    for row in rows:
        out = row.out_dir(tmp_path)
        result = json.loads((out / "metrics.json").read_text())
        metrics = result["metrics"]
        assert metrics and all(math.isfinite(v) for v in metrics.values()), row
        if row.table == "f01":
            assert set(metrics) == {f"mean_offdiag_CKA_{r}" for r in CKA_RUNS}
            assert all(-0.1 < v <= 1.0 for v in metrics.values())
        else:
            assert "FD_digits" in metrics and all(k.endswith("_digits") for k in metrics), row
            assert result["metric_info"]["extractor"].startswith("digits-cnn")
        executed = (out / "notebook.ipynb").read_text()
        assert "injected-parameters" in executed and "text/html" in executed  # the display
        assert "IProgress not found" not in executed  # no widget warning: text bars
        if row.table == "f01":
            assert "application/vnd.plotly.v1+json" in executed  # the CKA figure
    # shared rows train once: one run directory per distinct configuration
    distinct = {d for row in rows for d in _run_dirs(row.stem, "smoke", row.row)}
    assert len(list((tmp_path / "runs").iterdir())) == len(distinct) < len(rows)
