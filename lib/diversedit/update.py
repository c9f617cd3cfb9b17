"""The parameter update of a training step as one fused function: clipping, AdamW, EMA.

The release runs three library steps over every parameter tensor: ``clip_grad_norm_`` (a norm
pass, then a pass that rescales the gradients in place), ``AdamW.step`` and the EMA lerp, each a
separate pass over the fp32 parameters, gradients and state (about 12 ms per SiT-XL/2 step on an
H200, NOTES entry 7). :class:`FusedUpdate` writes the same mathematics as one function of
``torch._foreach_*`` operations that ``torch.compile`` fuses, or runs it as two Triton kernels
(:mod:`.update_triton`, which build in seconds where Inductor takes minutes): a norm pass over
the gradients, then one pass that reads gradient, parameter, moments and EMA once and writes
each once (the clipped gradient is never written back). The optimiser keeps owning the state,
so checkpoints are the same either way and a run may resume with or without it. The Triton
kernels take the SiT-XL/2 update from 10.5 to 7.6 ms on an H200: the trainer's default on CUDA
with bf16 or no mixed precision (``precision.update: null``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .triton_support import triton_runs_on


def _foreach_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    emas: list[Tensor],
    frozen: list[Tensor],
    frozen_emas: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_norm: float,
    ema_weight: float,
) -> Tensor:
    """Clip the gradients to ``max_norm`` (0: no clipping), take an AdamW step (decoupled weight
    decay, bias-corrected moments as ``torch.optim.AdamW``), then move the EMA ``ema_weight`` of
    the way to the new parameters; ``frozen`` parameters (no gradient) only move their EMA.
    Returns the gradients' total L2 norm before clipping (0 when clipping is off)."""
    if max_norm > 0:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s coefficient
        grads = torch._foreach_mul(grads, coef)
    else:
        norm = torch.zeros((), device=params[0].device)
    torch._foreach_add_(steps, 1)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # per tensor, at its own step t: p += −lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)
    step_size = torch._foreach_div(torch._foreach_sub(torch._foreach_pow(beta1, steps), 1), lr)
    torch._foreach_reciprocal_(step_size)  # lr / (β1ᵗ − 1)
    bias2 = torch._foreach_sqrt(
        torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(beta2, steps), 1))
    )
    denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), bias2)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, step_size), denom)
    torch._foreach_lerp_(emas, params, ema_weight)
    if frozen:
        torch._foreach_lerp_(frozen_emas, frozen, ema_weight)
    return norm


UPDATE_IMPLS = ("compiled", "triton", "eager")


class FusedUpdate:
    """One optimiser step of ``optimizer``'s parameters: clip, AdamW, EMA (:func:`_foreach_update`).

    ``optimizer`` is a one-group ``torch.optim.AdamW`` (plain: no amsgrad, maximize or
    differentiable); its state is created as the fused AdamW creates it (``step`` a float32
    tensor on the parameter's device, zero moments) and updated in place. ``ema`` holds the EMA
    tensors in the order of the parameters. ``compiled=False`` runs the same function eagerly, as
    does a call under a dispatch mode (e.g. FLOP counting), which compiled code does not enter.
    Hyperparameters are read at every call and compiled in as constants (a changed ``lr``
    recompiles).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        ema: list[Tensor],
        *,
        max_norm: float,
        ema_decay: float,
        impl: Literal["compiled", "triton", "eager"] = "compiled",
    ) -> None:
        self.optimizer = opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if not isinstance(opt, torch.optim.AdamW) or len(opt.param_groups) != 1:
            raise ValueError("FusedUpdate needs a torch.optim.AdamW with one parameter group")
        group = opt.param_groups[0]
        odd = [k for k in ("amsgrad", "maximize", "differentiable") if group.get(k)]
        if odd:
            raise ValueError(f"FusedUpdate implements plain AdamW, not {odd}")
        if len(ema) != len(group["params"]):
            raise ValueError(
                f"FusedUpdate: {len(ema)} EMA tensors for {len(group['params'])} parameters"
            )
        if impl not in UPDATE_IMPLS:
            raise ValueError(f"FusedUpdate: impl {impl!r} is not one of {UPDATE_IMPLS}")
        self.ema, self.max_norm, self.ema_decay = list(ema), max_norm, ema_decay
        self.fn = _foreach_update
        if impl == "compiled":
            self.fn = torch.compile(_foreach_update, fullgraph=True, dynamic=False)
        elif impl == "triton":
            device = group["params"][0].device
            if not triton_runs_on(device):
                raise ValueError(
                    f"FusedUpdate: the Triton kernels need a CUDA device, not {device}"
                )
            from .update_triton import TritonUpdate

            self.fn = TritonUpdate()

    @torch.no_grad()
    def __call__(self) -> Tensor:
        """Update parameters, moments and EMA from the current gradients; returns the gradients'
        norm before clipping (0 with clipping off). Gradients are read, not changed."""
        group, state = self.optimizer.param_groups[0], self.optimizer.state
        live: list[list[Tensor]] = [[], [], [], [], [], []]
        frozen: list[list[Tensor]] = [[], []]
        for p, e in zip(group["params"], self.ema, strict=True):
            if p.grad is None:
                frozen[0].append(p)
                frozen[1].append(e)
                continue
            s = state[p]
            if not s:
                s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif s["step"].device != p.device:  # a state saved by the unfused AdamW
                s["step"] = s["step"].to(device=p.device, dtype=torch.float32)
            tensors = (p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"], e)
            for out, t in zip(live, tensors, strict=True):
                out.append(t)
        if not live[0]:
            raise ValueError("FusedUpdate: no parameter has a gradient")
        beta1, beta2 = group["betas"]
        fn = _foreach_update if _get_current_dispatch_mode() is not None else self.fn
        return fn(
            *live, *frozen,
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], max_norm=self.max_norm,
            ema_weight=1.0 - self.ema_decay,
        )  # fmt: skip
