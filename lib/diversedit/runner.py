"""Batch runner: every row file of a tier through its notebook with papermill.

``reproduce(["t01"], "smoke")`` runs ``notebooks/t01_model_scales.py`` (jupytext, converted to
``.ipynb`` at run time) once per row file ``params/t01_model_scales/smoke/<row>.yaml`` into
``results/t01/smoke/<row>/`` (``notebook.ipynb``, logs, and the ``metrics.json`` that the
notebook writes last). A row is done only when its ``metrics.json`` exists after a run without
error; done rows are skipped unless forced. Failures (a cell error, a dead kernel, anything) do
not stop the batch; they make the return value non-zero. A summary goes to stdout and to
``results/<tier>-runs.json``. Several rows may run at once, each in a worker process
(``jobs``; :func:`run_order` says which rows must wait for which).

``validate_params()`` checks every notebook and row file without running anything.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from .files import atomic_write_bytes, environ, usable_cpus
from .results import TIERS, table_id

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_NAME = "diversedit"
# batch runs: no kernel-app log below ERROR (ipykernel 7 warns on every start that a local
# kernel talks over unencrypted TCP); the notebooks' own warnings still reach their outputs
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
METRICS_FILE = "metrics.json"
# papermill runs: plotly figures carry HTML (blank in nbconvert otherwise), no progress bars
RUN_ENV = {"PLOTLY_RENDERER": "plotly_mimetype+notebook", "TQDM_DISABLE": "1"}
SMOKE_ENV = {"OMP_NUM_THREADS": "1"}  # tiny CPU models: one intra-op thread is fastest
MAX_SMOKE_JOBS = 8  # smoke rows at once by default (a row's kernel peaks at about 1.4 GB)
SHELL_ESCAPES = ("!", "%%bash", "%%sh", "%%script", "%sx", "%system")


@dataclass(frozen=True)
class Row:
    """One row file of one notebook at one tier."""

    stem: str  # notebook stem, e.g. t01_model_scales
    table: str  # table id, e.g. t01
    tier: str
    row: str  # row slug = the row file's stem
    notebook: Path
    params_file: Path

    def out_dir(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / self.table / self.tier / self.row


@dataclass
class Outcome:
    """What happened to one row in a batch."""

    table: str
    row: str
    tier: str
    status: str  # done | diverged (a result too: the run stopped on a NaN) | skipped | failed
    seconds: float
    error: str | None
    out_dir: str


# --------------------------------------------------------------------------- discovery


def notebook_stems(root: str | Path = REPO_ROOT) -> list[str]:
    """Stems of ``notebooks/[tf]NN_*.py`` (other notebooks, e.g. the report, are not rows)."""
    stems = []
    for path in sorted(Path(root, "notebooks").glob("*.py")):
        try:
            table_id(path.stem)
        except ValueError:
            continue
        stems.append(path.stem)
    return stems


def discover(
    tables: Sequence[str] | None,
    tier: str,
    rows: Sequence[str] | None = None,
    root: str | Path = REPO_ROOT,
) -> list[Row]:
    """The rows to run: ``tables`` are ids (``t01``) or stems; ``rows`` are row slugs."""
    root = Path(root)
    stems = notebook_stems(root)
    if tables:
        unknown = [t for t in tables if not any(t in (s, table_id(s)) for s in stems)]
        if unknown:
            raise ValueError(f"unknown table(s) {unknown}; notebooks: {stems}")
        stems = [s for s in stems if s in tables or table_id(s) in tables]
    found = [
        Row(s, table_id(s), tier, f.stem, root / "notebooks" / f"{s}.py", f)
        for s in stems
        for f in sorted((root / "params" / s / tier).glob("*.yaml"))
    ]
    if rows:
        missing = sorted(set(rows) - {r.row for r in found})
        if missing:
            raise ValueError(f"no {tier} row file for row(s) {missing} in {stems}")
        found = [r for r in found if r.row in rows]
    if not found:
        raise ValueError(f"no {tier} row files under params/<stem>/{tier}/ for {stems}")
    return found


def to_ipynb(source: str | Path, dest: str | Path) -> Path:
    """Convert a jupytext ``py:percent`` notebook to ``.ipynb`` (papermill cannot read .py)."""
    import jupytext

    nb = jupytext.read(str(source))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(nb, str(dest), fmt="ipynb")
    return dest


def read_row_file(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a row file must be a mapping of parameters")
    return data


# --------------------------------------------------------------------------- kernel


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Register kernelspec ``name`` for this interpreter in ``sys.prefix`` (a venv or conda env)
    unless one that runs this interpreter is already visible; returns ``name``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def current() -> Any:
        try:
            return KernelSpecManager().get_kernel_spec(name)
        except NoSuchKernel:
            return None

    spec = current()
    if spec is None or os.path.abspath(spec.argv[0]) != os.path.abspath(sys.executable):
        from ipykernel.kernelspec import install

        install(kernel_name=name, display_name="Python (diversedit)", prefix=sys.prefix)
        spec = current()
        if spec is None or os.path.abspath(spec.argv[0]) != os.path.abspath(sys.executable):
            where = spec.resource_dir if spec else "?"
            warnings.warn(f"kernel {name!r} ({where}) does not run {sys.executable}", stacklevel=2)
    return name


def default_kernel() -> str:
    """``diversedit`` (registered by :func:`ensure_kernel` if needed), else ``python3``."""
    try:
        return ensure_kernel()
    except Exception as err:  # e.g. a read-only environment
        from jupyter_client.kernelspec import KernelSpecManager

        warnings.warn(f"cannot register the {KERNEL_NAME!r} kernel: {err}", stacklevel=2)
        found = KERNEL_NAME in KernelSpecManager().find_kernel_specs()
        return KERNEL_NAME if found else "python3"


# --------------------------------------------------------------------------- running


def _run_env(tier: str) -> dict[str, str]:
    """Environment of a row's kernel: RUN_ENV, plus SMOKE_ENV for the smoke tier unless the
    caller set those variables."""
    extra = {k: v for k, v in SMOKE_ENV.items() if k not in os.environ} if tier == "smoke" else {}
    return RUN_ENV | extra


def _describe(err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return f"{err.ename}: {err.evalue} (cell {err.exec_count})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _results_param(results_dir: Path, root: Path) -> str:
    """Relative to the repository root (the kernel's cwd) when inside it, else absolute, so a
    run's recorded ``results_dir`` is the same from the runner and from an interactive kernel."""
    try:
        return str(results_dir.relative_to(root.resolve()))
    except ValueError:
        return str(results_dir)


def run_one(
    row: Row,
    results_dir: str | Path,
    kernel: str,
    *,
    force: bool = False,
    root: str | Path = REPO_ROOT,
) -> Outcome:
    """Execute one row's notebook; never raises for the row's own failures."""
    from papermill import execute_notebook

    root = Path(root)
    results_dir = Path(results_dir).resolve()
    out = row.out_dir(results_dir)
    metrics = out / METRICS_FILE
    if metrics.is_file() and not force:
        return Outcome(row.table, row.row, row.tier, "skipped", 0.0, None, str(out))
    start, error = time.perf_counter(), None
    try:
        out.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)  # forced: only this run's file may count
        params = read_row_file(row.params_file) | {"results_dir": _results_param(results_dir, root)}
        (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        source = to_ipynb(row.notebook, out / "notebook.input.ipynb")
        with (
            environ(_run_env(row.tier)),
            open(out / "stdout.log", "w") as stdout,
            open(out / "stderr.log", "w") as stderr,
        ):
            execute_notebook(
                str(source),
                str(out / "notebook.ipynb"),
                parameters=params,
                kernel_name=kernel,
                language="python",
                cwd=str(root),
                progress_bar=False,
                stdout_file=stdout,
                stderr_file=stderr,
                start_timeout=300,  # cold nodes
                shutdown_kernel="immediate",  # results are on disk; saves ~2 s of torch teardown
                extra_arguments=KERNEL_ARGUMENTS,
            )
    except Exception as err:  # a cell error, a dead kernel, a bad row file: the row failed
        error = _describe(err)
    if error is None and not metrics.is_file():
        error = f"the notebook finished without writing {metrics}"
    status = "failed" if error else _result_status(metrics)
    seconds = round(time.perf_counter() - start, 1)
    return Outcome(row.table, row.row, row.tier, status, seconds, error, str(out))


def default_jobs(tier: str) -> int:
    """``diversedit reproduce``'s rows at once: one per usable CPU core for the smoke tier (its
    kernels use one thread each, ``SMOKE_ENV``), at most :data:`MAX_SMOKE_JOBS`; one for the
    paper tier (rows that train may run for days on one GPU each; ``--jobs`` shares out a
    node's GPUs)."""
    return min(usable_cpus(), MAX_SMOKE_JOBS) if tier == "smoke" else 1


def worker_gpus(jobs: int) -> list[str]:
    """One GPU per parallel worker, round-robin over the visible ones (``CUDA_VISIBLE_DEVICES``
    when set, else every GPU torch sees); empty with fewer than two GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    else:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    return [ids[k % len(ids)] for k in range(jobs)] if len(ids) > 1 else []


def _take_gpu(gpus: Any) -> None:
    """Worker initializer: this worker's rows (and their kernels) see one GPU of ``gpus``."""
    if not gpus.empty():
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()


def _announced(flag: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """In a worker: leave the file ``flag`` (the call was taken up), then call ``fn``."""
    Path(flag).touch()
    return fn(*args, **kwargs)


class _RowExecutor(Executor):
    """An executor that can tell a call its pool never started from one that ran."""

    def never_started(self, future: Future) -> bool:
        """Whether ``future`` failed because its worker pool broke before a worker took it up."""
        return False


def _executor(jobs: int, gpus: Sequence[str] = ()) -> _RowExecutor:
    """The runner's own process for one row at a time, else :class:`_Workers`."""
    return _InlineExecutor() if jobs == 1 else _Workers(jobs, gpus)


class _Workers(_RowExecutor):
    """Spawned worker processes for parallel rows (each sets its kernel's environment variables
    in its own ``os.environ``), each given one of ``gpus`` if any. When a worker dies (e.g. the
    out-of-memory killer), the rows it and its siblings were running fail, and later rows start
    in a fresh pool instead of failing too. Each call leaves a flag file when a worker takes it
    up, so a call the broken pool never started can be told apart (:meth:`never_started`)."""

    def __init__(self, jobs: int, gpus: Sequence[str] = ()) -> None:
        self.jobs, self.gpus = jobs, list(gpus)
        self.pool = self._new_pool()
        self.flags = Path(tempfile.mkdtemp(prefix="diversedit-workers-"))
        self.sent: dict[Future, tuple[Path, ProcessPoolExecutor]] = {}  # flag and pool per call

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        queue = context.SimpleQueue()
        for gpu in self.gpus:
            queue.put(gpu)
        return ProcessPoolExecutor(self.jobs, context, initializer=_take_gpu, initargs=(queue,))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        flag = self.flags / str(len(self.sent))
        call = partial(_announced, str(flag), fn)
        try:
            future = self.pool.submit(call, *args, **kwargs)
        except BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            future = self.pool.submit(call, *args, **kwargs)
        self.sent[future] = flag, self.pool
        return future

    def never_started(self, future: Future) -> bool:
        if future not in self.sent or not isinstance(future.exception(), BrokenProcessPool):
            return False
        flag, pool = self.sent[future]
        pool.shutdown(wait=True)  # its workers are gone: none can still take the call up
        return not flag.exists()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        try:
            self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        finally:
            shutil.rmtree(self.flags, ignore_errors=True)


class _InlineExecutor(_RowExecutor):
    """Runs each submitted call at once in the caller's process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # handed to the caller through the future
            future.set_exception(err)
        return future


def _scheduled(
    after: Sequence[set[int]],
    jobs: int,
    start: Callable[[int], Future],
    again: Callable[[int, Future], bool] = lambda i, future: False,
) -> Iterator[tuple[int, Future]]:
    """Start item i (``start(i)``) once every item in ``after[i]`` has finished, at most ``jobs``
    at a time and otherwise in order; yield (i, its finished future) as items finish, except
    that an item for which ``again(i, future)`` is true goes back to wait its turn instead.
    ``after`` may only name earlier items, so the first waiting item can always start."""
    waiting, running, finished = list(range(len(after))), {}, set()
    while waiting or running:
        for i in [i for i in waiting if after[i] <= finished][: jobs - len(running)]:
            waiting.remove(i)
            try:
                running[start(i)] = i
            except Exception as err:  # e.g. a broken process pool: this item fails, not the batch
                failed: Future = Future()
                failed.set_exception(err)
                running[failed] = i
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=running.get):
            i = running.pop(future)
            if again(i, future):
                bisect.insort(waiting, i)
                continue
            finished.add(i)
            yield i, future


def _outcome(row: Row, future: Future, results: Path) -> Outcome:
    """The row's outcome, or a failure when its worker process itself failed."""
    err = future.exception()
    if err is None:
        return future.result()
    error = _describe(err)
    if isinstance(err, BrokenProcessPool):
        error = f"a worker process died while this row ran (killed? out of memory?): {error}"
    out = str(row.out_dir(results))
    return Outcome(row.table, row.row, row.tier, "failed", 0.0, error, out)


def _result_status(metrics: Path) -> str:
    """``diverged`` when the row's results file says so, else ``done``."""
    try:
        status = json.loads(metrics.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return "done"
    return "diverged" if status == "diverged" else "done"


def _summary(outcomes: Sequence[Outcome], elapsed: float) -> str:
    width = max([len("table/row"), *(len(f"{o.table}/{o.row}") for o in outcomes)])
    lines = [f"{'table/row':<{width}}  {'status':<8}  {'seconds':>7}  error"]
    for o in outcomes:
        err = (o.error or "")[:120]
        lines.append(f"{o.table + '/' + o.row:<{width}}  {o.status:<8}  {o.seconds:>7.1f}  {err}")
    done = sum(o.status != "failed" for o in outcomes)
    rows = sum(o.seconds for o in outcomes)
    lines.append(f"{done}/{len(outcomes)} rows done in {elapsed:.0f} s ({rows:.0f} s of rows)")
    return "\n".join(lines)


def _write_runs(results_dir: Path, tier: str, outcomes: Sequence[Outcome]) -> Path:
    """Merge this batch into ``<results_dir>/<tier>-runs.json`` (one entry per table/row)."""
    path = results_dir / f"{tier}-runs.json"
    entries: dict[str, dict[str, Any]] = {}
    if path.is_file():
        try:
            entries = {f"{e['table']}/{e['row']}": e for e in json.loads(path.read_text())["rows"]}
        except (ValueError, KeyError, TypeError):
            entries = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for o in outcomes:
        entries[f"{o.table}/{o.row}"] = asdict(o) | {"finished": stamp}
    doc = {"tier": tier, "updated": stamp, "rows": [entries[k] for k in sorted(entries)]}
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def reproduce(
    tables: Sequence[str] | None,
    tier: str,
    *,
    results_dir: str | Path = "results",
    force: bool = False,
    kernel: str | None = None,
    rows: Sequence[str] | None = None,
    root: str | Path = REPO_ROOT,
    jobs: int = 1,
) -> int:
    """Run every selected row of ``tier``; 0 when all rows are done, else 1.

    ``tables``: table ids or notebook stems (None: all); ``rows``: row slugs (None: all);
    ``results_dir`` is relative to the current directory; ``root`` holds notebooks/ and params/
    and is the kernels' working directory; ``jobs``: rows at once, run by that many worker
    processes (on a node with several GPUs each worker is given one of them,
    :func:`worker_gpus`), a row starting only after the rows that share a run or a trajectory
    with it (:func:`run_order`); the command line's default is :func:`default_jobs`. A script
    that calls this with ``jobs > 1`` needs an ``if __name__ == "__main__":`` guard (workers are
    spawned, and a spawned process imports the main module). Raises ValueError for unknown
    tables, rows or tiers, and, before anything runs, for any problem :func:`preflight` finds
    in the rows to run.
    """
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r} is not one of {TIERS}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    selected = discover(tables, tier, rows, root)
    results = Path(results_dir).resolve()
    pending = [r for r in selected if force or not (r.out_dir(results) / METRICS_FILE).is_file()]
    problems = preflight(pending, root)
    if problems:
        raise ValueError("nothing was run; fix these first:\n" + "\n".join(problems))
    kernel = kernel or default_kernel()
    began = time.perf_counter()
    todo = set(pending)
    outcomes = {  # run_one only says "skipped" for these
        row: run_one(row, results, kernel, root=root) for row in selected if row not in todo
    }
    for n, row in enumerate(outcomes, start=1):
        print(f"[{n}/{len(selected)}] {row.table}/{tier}/{row.row}: skipped (done)", flush=True)
    jobs = min(jobs, max(1, len(pending)))
    order, after = run_order(pending) if jobs > 1 else (pending, [set()] * len(pending))
    run = partial(run_one, results_dir=results, kernel=kernel, force=force, root=root)
    gpus = worker_gpus(jobs) if jobs > 1 else []
    if gpus:
        print(f"{jobs} rows at a time, on GPUs {','.join(gpus)} (one per worker)", flush=True)
    retried: set[int] = set()
    with _executor(jobs, gpus) as pool:

        def again(i: int, future: Future) -> bool:  # once, for a row its broken pool never ran
            if i in retried or not pool.never_started(future):
                return False
            retried.add(i)
            print(f"{order[i].table}/{tier}/{order[i].row}: not started before a worker died; "
                  "queued again", flush=True)  # fmt: skip
            return True

        for i, future in _scheduled(after, jobs, lambda i: pool.submit(run, order[i]), again):
            row = order[i]
            outcome = outcomes[row] = _outcome(row, future, results)
            note = f" — {outcome.error}" if outcome.error else ""
            print(
                f"[{len(outcomes)}/{len(selected)}] {row.table}/{tier}/{row.row}: "
                f"{outcome.status} ({outcome.seconds:.1f} s){note}",
                flush=True,
            )
    outcomes = [outcomes[row] for row in selected]
    print(_summary(outcomes, time.perf_counter() - began))
    print(f"summary: {_write_runs(results, tier, outcomes)}")
    return 0 if all(o.status != "failed" for o in outcomes) else 1


# --------------------------------------------------------------------------- validation


def notebook_problems(path: str | Path) -> list[str]:
    """Exactly one ``parameters`` cell, kernelspec ``diversedit``, no shell escapes."""
    import jupytext

    nb = jupytext.read(str(path))
    problems = []
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells tagged 'parameters' (need exactly 1)")
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != KERNEL_NAME:
        problems.append(f"kernelspec name {kernel!r} (need {KERNEL_NAME!r})")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            if line.lstrip().startswith(SHELL_ESCAPES):
                problems.append(f"cell {i}: shell escape {line.strip()!r} (use subprocess)")
    return problems


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """``{name: default value}`` of a notebook's parameters cell, as papermill infers them."""
    from papermill import inspect_notebook

    with tempfile.TemporaryDirectory() as tmp:
        info = inspect_notebook(str(to_ipynb(path, Path(tmp) / "nb.ipynb")))
    return {name: ast.literal_eval(p["default"]) for name, p in info.items()}


def schema_problem(names: Sequence[str]) -> str | None:
    """None when ``names`` are exactly RowParams' or CkaParams' fields, else the difference."""
    from .pipeline import CKA_PARAMETERS, ROW_PARAMETERS

    if set(names) in (set(ROW_PARAMETERS), set(CKA_PARAMETERS)):
        return None
    closest = min((ROW_PARAMETERS, CKA_PARAMETERS), key=lambda s: len(set(s) ^ set(names)))
    missing, extra = sorted(set(closest) - set(names)), sorted(set(names) - set(closest))
    return (
        f"parameters are neither RowParams' nor CkaParams' fields: missing {missing}, extra "
        f"{extra} (a line with two '=' is skipped by papermill's parameter inspection)"
    )


def row_configs(
    values: Mapping[str, Any], source: str = "<row>", *, check_paths: bool = False
) -> list[Any]:
    """The RunConfigs a notebook builds from these complete parameters; ``check_paths`` also
    checks every file the row reads (data, weights, reference batch: ``RowParams.preflight``)."""
    from .pipeline import CKA_PARAMETERS, cka_params, row_params

    problem = schema_problem(list(values))
    if problem:
        raise ValueError(problem)
    if set(values) == set(CKA_PARAMETERS):
        params = cka_params(dict(values), source)
        return list(params.run_configs(check_paths=check_paths).values())
    params = row_params(dict(values), source)
    return [params.preflight() if check_paths else params.run_config(check_paths=False)]


def _label_problems(paths: Sequence[Path], among: Sequence[Path] | None = None) -> list[str]:
    """Row files of one table and tier that share a display label (the report's row index),
    or only those pairs with a file ``among`` the given ones."""
    seen: dict[str, Path] = {}
    problems = []
    for path in paths:
        try:
            values = read_row_file(path)
        except (OSError, ValueError, yaml.YAMLError):
            continue  # reported by _row_file_problems
        label = str(values.get("label") or path.stem)
        first = seen.setdefault(label, path)
        if first != path and (among is None or first in among or path in among):
            problems.append(f"{path.name}: label {label!r} is also the label of {first.name}")
    return problems


def _row_file_problems(
    path: Path, stem: str, tier: str, declared: Mapping[str, Any], check_paths: bool = False
) -> tuple[list[str], list[Any]]:
    try:
        values = read_row_file(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        return [str(err)], []
    problems = [
        f"{k!r} is not a parameter of notebooks/{stem}.py" for k in values if k not in declared
    ]
    expected = {"table": table_id(stem), "row": path.stem, "tier": tier}
    for key, want in expected.items():
        if values.get(key) != want:
            problems.append(f"{key} is {values.get(key)!r}, expected {want!r}")
    for key, value in values.items():
        default = declared.get(key)
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            problems.append(f"{key}: {value!r} is not a number (YAML floats need a dot: 1.0e-4)")
    if problems or schema_problem(list(declared)):  # no configuration to build
        return problems, []
    try:
        values = dict(declared) | values | {"results_dir": "results"}
        configs = row_configs(values, str(path), check_paths=check_paths)
    except ValueError as err:  # ConfigError is a ValueError
        return [str(err)], []
    return [], configs


def preflight(rows: Sequence[Row], root: str | Path = REPO_ROOT) -> list[str]:
    """What would stop these rows, found before any of them runs: the row files' keys, values
    and labels as ``--validate`` checks them, and every file they read (data, weights,
    reference batch)."""
    root = Path(root)
    problems: list[str] = []
    for stem, tier in dict.fromkeys((r.stem, r.tier) for r in rows):
        declared = notebook_parameters(root / "notebooks" / f"{stem}.py")
        mine = [r.params_file for r in rows if (r.stem, r.tier) == (stem, tier)]
        table_rows = sorted((root / "params" / stem / tier).glob("*.yaml"))
        problems += [f"params/{stem}/{tier}/{p}" for p in _label_problems(table_rows, mine)]
        for path in mine:
            found, _ = _row_file_problems(path, stem, tier, declared, check_paths=True)
            problems += [f"{path.relative_to(root)}: {p}" for p in found]
    return problems


def validate_params(root: str | Path = REPO_ROOT) -> list[str]:
    """Every problem of the notebooks and their row files (empty when all are valid).

    Per notebook: one parameters cell, no shell escapes, a smoke tier. Per row file: keys are
    notebook parameters (``papermill.inspect_notebook``), numbers are numbers, ``table``/``row``/
    ``tier`` match its place, and it builds RowParams (or CkaParams) and RunConfigs. Across row
    files: labels are unique within a table and tier, and rows that share a run (config hash)
    resolve to the same configuration, or the trainer would refuse the second one.
    """
    root = Path(root)
    problems: list[str] = []
    shared: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
    for stem in notebook_stems(root):
        nb_path = root / "notebooks" / f"{stem}.py"
        problems += [f"notebooks/{stem}.py: {p}" for p in notebook_problems(nb_path)]
        try:
            declared = notebook_parameters(nb_path)
        except (ValueError, SyntaxError) as err:
            problems.append(f"notebooks/{stem}.py: parameters: {err}")
            continue
        problem = schema_problem(list(declared))
        if problem:
            problems.append(f"notebooks/{stem}.py: {problem}")
            continue
        tiers = sorted(d.name for d in (root / "params" / stem).glob("*") if d.is_dir())
        if "smoke" not in tiers or not any((root / "params" / stem / "smoke").glob("*.yaml")):
            problems.append(f"params/{stem}: no smoke row files")
        for tier in tiers:
            if tier not in TIERS:
                problems.append(f"params/{stem}/{tier}: not a tier {TIERS}")
                continue
            paths = sorted((root / "params" / stem / tier).glob("*.yaml"))
            problems += [f"params/{stem}/{tier}/{p}" for p in _label_problems(paths)]
            for path in paths:
                found, configs = _row_file_problems(path, stem, tier, declared)
                rel = path.relative_to(root)
                problems += [f"{rel}: {p}" for p in found]
                for cfg in configs:
                    key, resolved = (tier, cfg.hash()), cfg.to_dict()
                    first = shared.setdefault(key, (rel, resolved))
                    if first[1] != resolved:
                        problems.append(
                            f"{rel}: shares run {cfg.hash()} with {first[0]} but differs in "
                            "unhashed settings (name, logging, checkpoint, workers)"
                        )
    return problems


def row_runs(rows: Sequence[Row]) -> list[dict[str, tuple[str, int]]]:
    """Per row, the runs it trains or reuses: run directory → (trajectory, step budget), the
    trajectory being :func:`~diversedit.config.trajectory_part` as JSON (equal for runs that
    differ only in ``optim.max_steps``). Rows of notebooks without a run configuration (neither
    RowParams nor CkaParams parameters) have none."""
    from .config import trajectory_part

    declared: dict[str, dict[str, Any]] = {}
    runs = []
    for row in rows:
        if row.stem not in declared:
            declared[row.stem] = notebook_parameters(row.notebook)
        if schema_problem(list(declared[row.stem])):
            runs.append({})
            continue
        values = declared[row.stem] | read_row_file(row.params_file) | {"results_dir": "results"}
        mine = {}
        for cfg in row_configs(values, str(row.params_file)):
            part = trajectory_part(json.loads(json.dumps(cfg.to_dict())))
            mine[str(cfg.run_dir())] = (json.dumps(part, sort_keys=True), cfg.optim.max_steps)
        runs.append(mine)
    return runs


def run_waves(rows: Sequence[Row]) -> list[tuple[Row, int]]:
    """Wave 1: the first row of each distinct set of runs; wave 2: rows whose runs all appear in
    wave 1 (on a cluster they only sample and evaluate, after wave 1 has trained), and a row of
    its own run that continues a wave-1 run with a smaller step budget (the same trajectory,
    ``checkpoint.continue_shorter``: it starts where that run ends)."""
    return list(zip(rows, _waves(row_runs(rows)), strict=True))


def _waves(runs: Sequence[dict[str, tuple[str, int]]]) -> list[int]:
    dirs = [set(r) for r in runs]
    budgets = {d: b for r in runs for d, b in r.items()}  # run dir → (trajectory, max_steps)
    seen: set[str] = set()
    waves = [1] * len(runs)
    for i in sorted(range(len(runs)), key=lambda i: len(dirs[i])):  # one-run rows train first
        waves[i] = 2 if dirs[i] <= seen else 1
        seen |= dirs[i]
    trained = {d for i, w in enumerate(waves) if w == 1 for d in dirs[i]}
    for i, row_dirs in enumerate(dirs):
        alone = all(not (row_dirs & other) for j, other in enumerate(dirs) if j != i)
        shorter = [budgets[d] for d in trained - row_dirs]
        continues = all(
            any(t == budgets[d][0] and n < budgets[d][1] for t, n in shorter) for d in row_dirs
        )
        if waves[i] == 1 and alone and continues:
            waves[i] = 2
    return waves


def run_order(rows: Sequence[Row]) -> tuple[list[Row], list[set[int]]]:
    """The rows in the order a batch starts them (wave 1, then wave 2, each in the given order)
    and, per row of that order, the earlier rows it must wait for: those that train or reuse one
    of its runs, or a run on one of its runs' trajectories with a smaller step budget (which its
    run continues, ``checkpoint.continue_shorter``). Other rows may run at the same time."""
    runs = row_runs(rows)
    waves = _waves(runs)
    order = sorted(range(len(rows)), key=lambda i: waves[i])
    runs = [runs[i] for i in order]

    def waits(i: int, j: int) -> bool:
        theirs, mine = runs[j].values(), runs[i].values()
        shorter = any(t == u and n < m for t, n in theirs for u, m in mine)
        return shorter or bool(runs[i].keys() & runs[j].keys())

    after = [{j for j in range(i) if waits(i, j)} for i in range(len(order))]
    return [rows[i] for i in order], after


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None, *, root: str | Path = REPO_ROOT) -> int:
    """``diversedit reproduce [TABLE …] --tier smoke|paper [--results DIR] [--force]
    [--kernel NAME] [--rows ROW[,ROW …]] [--jobs N] [--validate] [--list [--wave 1|2]]``."""
    p = argparse.ArgumentParser(
        prog="diversedit reproduce",
        description="Run the table notebooks with papermill, one execution per row file.",
    )
    p.add_argument("tables", nargs="*", help="table ids (t01) or notebook stems; default: all")
    p.add_argument("--tier", default="smoke", choices=TIERS)
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--force", action="store_true", help="rerun rows that are already done")
    p.add_argument("--kernel", default=None, help="Jupyter kernel (default: diversedit)")
    p.add_argument(
        "--rows", action="append", default=[], help="row slugs, comma-separated (repeatable)"
    )
    p.add_argument("--validate", action="store_true", help="check notebooks and row files only")
    p.add_argument("--list", action="store_true", help="print 'STEM ROW' per selected row")
    p.add_argument("--wave", type=int, choices=(1, 2), help="with --list: rows of one wave")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="rows at once, each worker with its own GPU when there are several (default: one "
        f"per CPU core, at most {MAX_SMOKE_JOBS}, for the smoke tier; 1 for the paper tier)",
    )
    args = p.parse_args(argv)
    rows = [r for item in args.rows for r in item.split(",") if r] or None
    try:
        if args.validate:
            problems = validate_params(root)
            print("\n".join(problems) or "all notebooks and row files are valid")
            return 1 if problems else 0
        if args.list:
            selected = discover(args.tables or None, args.tier, rows, root)
            for row, wave in run_waves(selected):
                if args.wave in (None, wave):
                    print(row.stem, row.row)
            return 0
        return reproduce(
            args.tables or None,
            args.tier,
            results_dir=args.results,
            force=args.force,
            kernel=args.kernel,
            rows=rows,
            root=root,
            jobs=default_jobs(args.tier) if args.jobs is None else args.jobs,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
