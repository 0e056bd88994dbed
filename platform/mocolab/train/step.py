"""One training step as every worker runs it, and the loss bookkeeping around it, with no host read per step.

``TrainStep`` is the step of ``train/pretrain.py``, of the benchmark's launcher baseline and of ``mocolab bench``'s
step timing (``bench/step.py``), so what the benchmark times is what runs: ``MoCo.forward`` under autocast
(``train.amp``: bf16, fp16 or off), backward (through a ``GradScaler`` for fp16), optimizer step. ``LossWatch``
sums the step losses on the device and remembers the first step whose loss was not finite; the loop reads it
back every ``train.check_finite_every`` steps, so a GPU is never made to wait for the host inside that window.
Torch only (the GPU check imports it without Ray, MLflow or pydantic).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.amp`` -> autocast dtype; ``off`` runs fp32."""
BACKWARD_RANGE = "mocolab.backward"
OPTIMIZER_RANGE = "mocolab.optimizer_step"
NO_STEP = torch.iinfo(torch.long).max  # LossWatch: no non-finite step seen


def check_amp(amp: str) -> None:
    """Raise ValueError naming ``train.amp`` unless it is bf16, fp16 or off."""
    if amp not in (*AMP_DTYPES, "off"):
        raise ValueError(f"train.amp={amp!r} is not one of bf16, fp16, off")


def make_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    amp: str = "off",
    name: str = "sgd",
) -> torch.optim.Optimizer:
    """The ``train.optimizer`` over ``params``: SGD (with fp16 the fused kernel, which takes the GradScaler's inf
    check on the device; a non-fused optimizer makes the scaler read it back on the host every step), MoCo v3's
    LARS (``train/lars.py``; ``momentum`` is its momentum) or AdamW (torch's defaults, as the v3 code: every
    parameter decayed, betas 0.9/0.999)."""
    params = list(params)
    if name == "lars":
        from mocolab.train.lars import LARS

        return LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name != "sgd":
        raise ValueError(f"train.optimizer={name!r} is not one of sgd, lars, adamw")
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True if amp == "fp16" else None
    )


class TrainStep:
    """Forward, backward and optimizer step of ``model`` (a ``MoCo``, DDP-wrapped or not) at precision ``amp``.

    Calling it returns the step's loss, detached, still on the device. ``scaler`` is the fp16 GradScaler (a
    disabled one otherwise); its state belongs in checkpoints."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: str, device_type: str) -> None:
        check_amp(amp)
        self.model, self.optimizer, self.amp, self.device_type = model, optimizer, amp, device_type
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp == "fp16")

    def __call__(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=AMP_DTYPES.get(self.amp), enabled=self.amp != "off"):
            loss = self.model(im_q, im_k, index).loss
        with record_function(BACKWARD_RANGE):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with record_function(OPTIMIZER_RANGE):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()


def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


class LossWatch:
    """An epoch's step losses, summed on the device, and the global step of the first non-finite one.

    ``add`` queues device work only. ``first_nonfinite_step`` and ``mean`` are collectives (every rank calls
    them at the same step) and read one value back each: the earliest non-finite step over all ranks, the mean
    loss over all ranks' steps."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), NO_STEP, dtype=torch.long, device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor, global_step: int) -> None:
        loss = loss.detach().float()
        self.total += loss
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=global_step))
        self.steps += 1

    def first_nonfinite_step(self) -> int | None:
        """The global step whose loss first was NaN/inf on any rank, or None."""
        step = int(_all_reduce(self.first_bad.clone(), dist.ReduceOp.MIN))
        return None if step == NO_STEP else step

    def mean(self) -> float:
        """Mean step loss over every rank's steps so far (NaN/inf once one was)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return float(_all_reduce(self.total.clone(), dist.ReduceOp.SUM)) / max(self.steps * world, 1)
