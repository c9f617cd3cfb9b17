"""The training loop: accelerate, EMA, atomic checkpoints, exact resume, preemption, NaN stop.

``python -m diversedit train PARAMS.yaml`` runs one process; the same module under
``accelerate launch`` runs DDP across GPUs and nodes. A run lives in ``config.run_dir()``; starting
the same configuration again resumes from its newest readable checkpoint with model, EMA,
optimizer, grad scaler, every process's RNG state and the data position restored.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import list_checkpoints, load_latest, prune, save_checkpoint
from .cka import block_similarity
from .config import differences, hashed_part, trajectory_part
from .data.sampler import BatchOrder
from .files import atomic_write_bytes, git_revision
from .host_memory import keep_freed_memory
from .losses.objective import compute_loss
from .models import SiT
from .triton_support import triton_runs_on
from .update import FusedUpdate

REQUEUE_EXIT_CODE = 85  # exit status after a SIGTERM/SIGUSR1 checkpoint: "requeue me"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf at ``step``; no checkpoint was written after it."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; exits with :data:`REQUEUE_EXIT_CODE`."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


class ResumeError(RuntimeError):
    """A run directory this start cannot continue exactly: its checkpoint was written by another
    number of processes, or its ``config.json`` has other hashed values."""


class _SignalFlag:
    """Records SIGTERM / SIGUSR1 so the loop can checkpoint at the next step boundary. Nested
    inside another (:func:`train` installs one before the model is built), it starts with what
    the outer one received."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            # ValueError off the main thread (e.g. a notebook kernel thread): no handler there
            with contextlib.suppress(ValueError):
                self._previous[sig] = previous = signal.signal(sig, self._handle)
                outer = getattr(previous, "__self__", None)
                if isinstance(outer, _SignalFlag) and outer.received is not None:
                    self.received = outer.received
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __exit__(self, *_exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _StopVote:
    """Whether to stop after a signal, agreed by every process, so that all of them checkpoint at
    the same step (the checkpoint is collective) even when the signal reaches them at different
    times. Each step boundary adds this process's flag to an all-reduce over a CPU (gloo) group
    that runs in the background until the next boundary reads it: no device sync, and every
    process stops one step after the first signal. One process: the flag itself."""

    def __init__(self, flag: _SignalFlag, num_processes: int) -> None:
        self.flag, self._pending = flag, None
        self._group = None
        if num_processes > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")

    def _reduce(self, async_op: bool) -> Any:
        import torch.distributed as dist

        vote = torch.tensor([int(self.flag.received is not None)], dtype=torch.int32)
        work = dist.all_reduce(vote, dist.ReduceOp.MAX, group=self._group, async_op=async_op)
        return vote, work

    def now(self) -> bool:
        """Blocking: has any process been signalled (e.g. while the model was being built)?"""
        if self._group is None:
            return self.flag.received is not None
        vote, _ = self._reduce(async_op=False)
        return bool(vote.item())

    def poll(self) -> bool:
        """At a step boundary: the verdict of the previous boundary's vote; starts this one's."""
        if self._group is None:
            return self.flag.received is not None
        stop = False
        if self._pending is not None:
            vote, work = self._pending
            work.wait()
            stop = bool(vote.item())
        self._pending = self._reduce(async_op=True)
        return stop

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model over parameters (REPA's EMA, every optimiser step)."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def _provenance(accelerator: Any) -> dict[str, Any]:
    import platform
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return git_revision() | {
        "python": platform.python_version(),
        "packages": {n: version(n) for n in ("torch", "timm", "accelerate", "diversedit-repro")},
        "hardware": {
            "platform": platform.platform(),
            "processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def build_dataset(data: Any) -> torch.utils.data.Dataset:
    """The training set a ``data:`` section describes; items are (x, label, uint8 image)."""
    from .data import DigitsDataset, LatentDataset

    if data.kind == "digits":
        return DigitsDataset(image_size=data.image_size, channels=data.channels, split="all")
    return LatentDataset(data.path)


class Trainer:
    """Owns one run: build everything from the config, then :meth:`fit`."""

    def __init__(self, config: Any, *, accelerator: Any | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from .encoders import build_encoder

        self.config = cfg = config
        self.run_dir = Path(cfg.run_dir())
        self.ckpt_dir = self.run_dir / "checkpoints"
        opt = cfg.optim
        self.accelerator = acc = accelerator or Accelerator(
            mixed_precision=cfg.precision.mixed_precision,
            gradient_accumulation_steps=opt.grad_accum,
            log_with="tensorboard" if cfg.logging.tensorboard else None,
            project_dir=str(self.run_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        # explicit choices only: the null defaults never pick the Triton kernels off CUDA
        for key, on in (
            ("diversity_triton", cfg.precision.diversity_triton is True),
            ("update", cfg.precision.update == "triton"),
        ):
            if on and not triton_runs_on(acc.device):
                raise ValueError(
                    f"precision.{key}: the Triton kernels need a CUDA device, not {acc.device} "
                    "(choose another setting, or TRITON_INTERPRET=1 to interpret them on the CPU)"
                )
        if acc.device.type == "cpu":
            keep_freed_memory()  # no page faults for every step's temporaries
        if acc.device.type == "cuda" and cfg.precision.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed = cfg.seed + acc.process_index  # release: set_seed(seed + process_index)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        self.model = SiT(cfg.model_config()).to(acc.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=opt.lr,
            betas=tuple(opt.betas),
            weight_decay=opt.weight_decay,
            eps=opt.eps,
            fused=acc.device.type == "cuda",
        )
        self.dataset = build_dataset(cfg.data)
        self.local_batch = opt.global_batch // (acc.num_processes * opt.grad_accum)
        if self.local_batch * acc.num_processes * opt.grad_accum != opt.global_batch:
            raise ValueError(
                f"optim.global_batch {opt.global_batch} is not divisible by "
                f"{acc.num_processes} processes × {opt.grad_accum} accumulation steps"
            )
        obj = cfg.objective
        needs_encoder = obj.repa is not None and obj.repa.coeff > 0
        self.encoder = None
        if needs_encoder:
            cfg_m = self.model.config
            self.encoder = build_encoder(
                cfg.encoder.name,
                cfg.encoder.weights,
                resolution=cfg.encoder.resolution or cfg.data.image_size,
                device=acc.device,
                token_grid=cfg_m.input_size // cfg_m.patch_size,
            )
        self.step = 0
        self.batches_consumed = 0  # micro-batches, the data position
        self._resumed_from: Path | None = None
        self._scaler_state: dict[str, Any] | None = None
        self._resume()
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        prec = cfg.precision
        self.compiled = prec.compile_on(acc.device)
        self.net = self.model
        if self.compiled and prec.compile_scope == "blocks":
            acc.unwrap_model(self.model).compile_blocks(prec.compile_mode)
        elif self.compiled:
            self.net = torch.compile(self.model, mode=prec.compile_mode)
        self.diversity_triton = prec.diversity_triton_on(acc.device, cfg.objective.diversity)
        self.update_impl = prec.update_on(acc.device)
        self.update = None  # clip, AdamW, EMA as one fused function
        if self.update_impl != "library":
            self.update = FusedUpdate(
                self.optimizer,
                list(self.ema.parameters()),
                max_norm=opt.grad_clip,
                ema_decay=opt.ema_decay,
                impl=self.update_impl,
            )

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        acc = self.accelerator
        rng = gather_object([_rng_state()])  # one entry per process
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        return {
            "model": acc.unwrap_model(self.model).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler,
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "rng": rng,
            "config": self.config.to_dict(),
            "model_config": dataclasses.asdict(self.ema.config),
        }

    def _resume(self) -> None:
        found = None
        if self.config.checkpoint.continue_shorter:
            own = max((s for s, _ in list_checkpoints(self.ckpt_dir)), default=-1)
            found = self._same_trajectory(after=own)
        found = found or load_latest(self.ckpt_dir)
        if found is None:
            return
        state, path = found
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._scaler_state = state.get("scaler")
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        rngs = state["rng"]
        index = self.accelerator.process_index
        if len(rngs) != self.accelerator.num_processes:
            raise ResumeError(
                f"{path} was written by {len(rngs)} processes; resume with the same number "
                f"(now {self.accelerator.num_processes}) for an exact continuation"
            )
        _set_rng_state(rngs[index])
        self._resumed_from = path

    def _same_trajectory(self, after: int) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint past step ``after`` and within this run's budget of another run
        in ``runs/`` whose configuration differs only in ``optim.max_steps`` and that had as
        many processes (the state this run would reach itself: nothing depends on the budget)."""
        runs = self.run_dir.parent
        if not runs.is_dir():
            return None
        mine = trajectory_part(json.loads(json.dumps(self.config.to_dict())))
        budget, candidates = self.config.optim.max_steps, []
        for d in sorted(runs.iterdir()):
            conf = d / "config.json"
            if d == self.run_dir or not conf.is_file():
                continue
            steps = [s for s, _ in list_checkpoints(d / "checkpoints") if after < s <= budget]
            if steps and trajectory_part(json.loads(conf.read_text())) == mine:
                candidates.append((max(steps), d.name))
        for _, name in sorted(candidates, reverse=True):  # load only the one used
            found = load_latest(runs / name / "checkpoints", max_step=budget)
            if found is not None and len(found[0]["rng"]) == self.accelerator.num_processes:
                return found
        return None

    def _started_elsewhere(self) -> bool:
        """Whether the state came from another run's checkpoint (:meth:`_same_trajectory`)."""
        return self._resumed_from is not None and self._resumed_from.parents[1] != self.run_dir

    def save(self) -> Path | None:
        acc = self.accelerator
        state = self.state_dict()  # collective: every process takes part
        path = None
        if acc.is_main_process:
            path = save_checkpoint(self.ckpt_dir, self.step, state)
            prune(self.ckpt_dir, self.config.checkpoint.keep_last)
        acc.wait_for_everyone()
        return path

    # --- data ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = BatchOrder(
            len(self.dataset),
            self.local_batch * self.accelerator.num_processes,
            seed=self.config.seed,
            rank=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            start=self.batches_consumed,
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=order,
            num_workers=self.config.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            persistent_workers=self.config.data.num_workers > 0,
            # its own generator: iterating a DataLoader draws a base seed, which must not
            # consume the global RNG (a resumed run creates one more loader than a straight one)
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        device = self.accelerator.device
        for x, y, images in loader:
            yield x.to(device, non_blocking=True), y.to(device), images.to(device)

    def _clean_inputs(self, x: Tensor) -> Tensor:
        """Latent moments → a posterior sample (ImageNet); pixels pass through (digits)."""
        if self.config.data.kind == "imagenet_latents":
            from .data.latents import sample_latents

            return sample_latents(x, self.config.data.latent_scale)
        return x

    # --- the loop --------------------------------------------------------------------------

    def fit(self, max_steps: int | None = None) -> Path:
        """Train until ``max_steps`` (default: the config's); returns the run directory."""
        cfg, acc = self.config, self.accelerator
        total = cfg.optim.max_steps if max_steps is None else max_steps
        self._write_run_files()
        if self._resumed_from is not None:
            acc.print(
                f"{self.run_dir} already finished at step {self.step}; nothing to do"
                if self.step >= total and not self._started_elsewhere()
                else f"resuming {self.run_dir} from step {self.step}"
                if not self._started_elsewhere()
                else f"continuing {self.run_dir} from step {self.step} of "
                f"{self._resumed_from.parents[1].name} (the configurations differ only in "
                "optim.max_steps; checkpoint.continue_shorter)"
            )
        if cfg.logging.tensorboard:
            acc.init_trackers(cfg.name)
        if self._scaler_state and acc.scaler is not None:
            acc.scaler.load_state_dict(self._scaler_state)
        log_file = self.run_dir / "log.jsonl"
        probe = self._cka_probe() if cfg.logging.cka_every else None
        sums: dict[str, Tensor] = {}
        bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        first_bad: dict[str, Tensor] = {}  # term → first step it was non-finite (-1: never)
        never = torch.full((), -1, dtype=torch.long, device=acc.device)
        batches = self._batches()
        bar = self._progress(total)
        t0, images, window, start = time.perf_counter(), 0, 0, self.step
        with _SignalFlag() as flag:
            vote = _StopVote(flag, acc.num_processes)
            if vote.now():  # signalled before the first step: nothing new to save
                acc.print(
                    f"signal {flag.received or 'on another process'}: exiting before training"
                )
                acc.end_training()
                raise Preempted()
            while self.step < total:
                for _ in range(cfg.optim.grad_accum):
                    x, y, pixels = next(batches)
                    self.batches_consumed += 1
                    terms, grad_norm = self._micro_step(x, y, pixels)
                images += x.shape[0] * acc.num_processes * cfg.optim.grad_accum
                self.step, window = self.step + 1, window + 1
                terms["grad_norm"] = grad_norm
                for k, v in terms.items():  # running sums and NaN flags: no host sync
                    v = v.float()
                    sums[k] = sums.get(k, 0.0) + v
                    if k == "grad_norm":  # inf on fp16 overflow steps, which the scaler skips
                        continue
                    now = ~torch.isfinite(v)
                    prev = first_bad.get(k, never)
                    first_bad[k] = torch.where(now & (prev < 0), self.step, prev)
                    bad = bad | now
                boundary = self.step % cfg.logging.log_every == 0 or self.step == total
                ckpt_due = self.step % cfg.checkpoint.every == 0 or self.step == total
                stop = vote.poll()
                if boundary or ckpt_due or stop:
                    self._check_finite(bad, first_bad)
                if boundary:
                    elapsed = time.perf_counter() - t0
                    self._log(log_file, sums, window, images / elapsed, bar)  # mean over window
                    sums, t0, images, window = {}, time.perf_counter(), 0, 0
                if probe is not None and self.step % cfg.logging.cka_every == 0:
                    self._cka_snapshot(probe)
                if ckpt_due or stop:
                    self.save()
                if stop:
                    vote.close()
                    who = flag.received or "on another process"
                    acc.print(f"signal {who}: checkpointed step {self.step}, exiting")
                    acc.end_training()
                    raise Preempted()
            vote.close()
        if self.step == start and self._started_elsewhere():  # at its budget already: it still
            self.save()  # gets a checkpoint of its own, to be sampled
        if bar is not None:
            bar.close()
        acc.end_training()
        return self.run_dir

    def _micro_step(self, x: Tensor, y: Tensor, pixels: Tensor) -> tuple[dict[str, Tensor], Any]:
        cfg, acc = self.config, self.accelerator
        x0 = self._clean_inputs(x)
        targets = None
        if self.encoder is not None:
            with torch.no_grad(), acc.autocast():
                targets = [self.encoder(pixels)]
        grad_norm = torch.zeros((), device=acc.device)
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, terms = compute_loss(
                    self.net,
                    x0,
                    y,
                    cfg.objective,
                    encoder_targets=targets,
                    teacher=self.ema,
                    compiled=self.compiled,
                    triton=self.diversity_triton,
                )
            acc.backward(loss)
            if self.update is not None:
                if acc.sync_gradients:
                    grad_norm = self.update()
            else:
                if acc.sync_gradients and cfg.optim.grad_clip > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                if acc.sync_gradients:
                    update_ema(self.ema, acc.unwrap_model(self.model), cfg.optim.ema_decay)
            self.optimizer.zero_grad(set_to_none=True)
        return terms, grad_norm

    # --- checks, logs, analysis ------------------------------------------------------------

    def _check_finite(self, bad: Tensor, first_bad: dict[str, Tensor]) -> None:
        if not bool(bad):  # one host sync per log / checkpoint interval, not per step
            return
        culprits = {k: int(s) for k, s in first_bad.items() if int(s) >= 0}
        step = min(culprits.values())
        first = [k for k, s in culprits.items() if s == step]
        terms = sorted(k for k in first if k != "loss") or first
        raise NonFiniteLossError(
            f"step {step}: loss term(s) {terms} became non-finite (first non-finite step per "
            f"term: {culprits}); the run stops without writing a checkpoint after it",
            step,
        )

    def _log(self, path: Path, sums: dict[str, Tensor], n: int, rate: float, bar: Any) -> None:
        acc = self.accelerator
        means = {k: v / n for k, v in sums.items()}
        means = {k: acc.reduce(v, reduction="mean").item() for k, v in means.items()}
        record = {"step": self.step, "images_per_s": rate} | means
        acc.log(record, step=self.step)
        if acc.is_main_process:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{rate:.1f}")
                bar.update(self.step - bar.n)

    def _progress(self, total: int) -> Any:
        if not (self.config.logging.progress and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step, desc=self.config.name, unit="step")

    def _cka_probe(self) -> tuple[Tensor, Tensor, Tensor]:
        """A fixed probe batch (first examples, fixed noise and t) for CKA snapshots."""
        n = min(self.config.logging.cka_probe_size, len(self.dataset))
        items = [self.dataset[i] for i in range(n)]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        gen = torch.Generator().manual_seed(self.config.seed)
        if self.config.data.kind == "imagenet_latents":
            from .data.latents import sample_latents

            x = sample_latents(x, self.config.data.latent_scale, generator=gen)
        t = torch.rand(n, generator=gen)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * torch.randn(
            x.shape, generator=gen
        )
        dev = self.accelerator.device
        return x_t.to(dev), t.to(dev), y.to(dev)

    def _cka_snapshot(self, probe: tuple[Tensor, Tensor, Tensor]) -> None:
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        sim = block_similarity(model, [probe]).numpy()
        out = self.run_dir / "cka"
        out.mkdir(exist_ok=True)
        np.save(out / f"step_{self.step:08d}.npy", sim)

    def _write_run_files(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.run_dir / "config.json"
        resolved = self.config.to_dict()
        mine = hashed_part(json.loads(json.dumps(resolved)))
        if config_file.exists():  # a resume may change how it runs, never what it trains
            diff = differences(hashed_part(json.loads(config_file.read_text())), mine)
            if diff:
                raise ResumeError(
                    f"{config_file} differs from this run's configuration: {'; '.join(diff)}"
                )
        else:
            # atomically: runs starting beside this one read every config.json in runs/
            atomic_write_bytes(config_file, json.dumps(resolved, indent=2).encode())
            if self._resumed_from is None:
                self._name_siblings(mine)
        prov = self.run_dir / "provenance.jsonl"
        entry = _provenance(self.accelerator) | {
            "resumed_from": str(self._resumed_from) if self._resumed_from else None,
            "step": self.step,
            "precision": resolved["precision"],  # this start's execution settings
            "execution": {  # what the null defaults resolved to on this device
                "compile": self.compiled,
                "diversity_triton": self.diversity_triton,
                "update": self.update_impl,
            },
        }
        with prov.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        _trim_log(self.run_dir / "log.jsonl", self.step)

    def _name_siblings(self, mine: dict[str, Any]) -> None:
        """On a fresh start, name the other runs of this name and what differs (a changed
        hashed value, e.g. ``optim.max_steps``, starts a new run instead of continuing one)."""
        pattern = re.compile(re.escape(self.config.name) + r"-[0-9a-f]{10}")
        found = []
        for d in sorted(self.run_dir.parent.iterdir()):
            if d != self.run_dir and pattern.fullmatch(d.name) and (d / "config.json").is_file():
                theirs = hashed_part(json.loads((d / "config.json").read_text()))
                found.append((len(diff := differences(theirs, mine)), d.name, diff))
        if not found:
            return
        lines = [f"new run {self.run_dir.name}; other runs named {self.config.name!r}:"]
        for _, name, diff in sorted(found)[:3]:
            lines.append(f"  {name} differs in {'; '.join(diff[:4])}{' …' if diff[4:] else ''}")
        lines.append("  (to train a run further, resume it with --max-steps N)")
        self.accelerator.print("\n".join(lines))


def _trim_log(path: Path, step: int) -> None:
    """Drop the log records past ``step`` (written after the checkpoint a run resumes from, before
    it was killed: those steps run again) and a torn last line, so no step is logged twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step and line.endswith("\n"):
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(kept).encode())


def train(config: Any, *, max_steps: int | None = None) -> Path:
    """Build a :class:`Trainer` for ``config`` and fit it; returns the run directory. A SIGTERM
    or SIGUSR1 while the model is built or a checkpoint loaded exits with
    :data:`REQUEUE_EXIT_CODE` too (before the first step)."""
    with _SignalFlag():
        return Trainer(config).fit(max_steps)
