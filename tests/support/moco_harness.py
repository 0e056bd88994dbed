"""What the MoCo fidelity tests need from mocolab, in one place: build a model, record the shuffle permutations
its step draws, read its queue and query-encoder gradients, feed it reproducible global batches, and build the
matching :class:`moco_reference.ReferenceMoCo` from its initial state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from moco_reference import ReferenceMoCo
from torch.testing import assert_close


def make_moco(cfg, num_train_samples: int = 64):
    """The model under test, in training mode (the one place the tests construct ``MoCo``)."""
    from mocolab.moco.model import MoCo

    return MoCo.from_config(cfg, num_train_samples).train()


@contextmanager
def recorded_permutations() -> Iterator[list[torch.Tensor]]:
    """Record (a copy of) every permutation ``mocolab.moco.distributed.shuffle_permutation`` returns meanwhile.
    On several ranks, rank 0's are the ones used (they are broadcast)."""
    from mocolab.moco import distributed

    drawn: list[torch.Tensor] = []
    original = distributed.shuffle_permutation

    def recording(*args, **kwargs):
        perm = original(*args, **kwargs)
        drawn.append(perm.clone())
        return perm

    distributed.shuffle_permutation = recording
    try:
        yield drawn
    finally:
        distributed.shuffle_permutation = original


def queue_and_pointer(model) -> tuple[torch.Tensor, int]:
    """The model's queue ``[K, dim]`` (a copy) and pointer, found by their state-dict names."""
    state = model.state_dict()
    (queue,) = [v for name, v in state.items() if name.split(".")[-1] == "queue"]
    (ptr,) = [v for name, v in state.items() if name.split(".")[-1] == "queue_ptr"]
    return queue.clone(), int(ptr)


def grads_of(encoder) -> dict[str, torch.Tensor]:
    """The gradients of an encoder's parameters by name (``backbone.*``, ``head.*``): mocolab's ``encoder_q`` or
    the reference's ``f_q``."""
    return {name: p.grad.clone() for name, p in encoder.named_parameters()}


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Every parameter's gradient equal within float32 round-off (the message names ``where`` and the parameter)."""
    assert actual.keys() == expected.keys(), f"{where}: parameters {sorted(actual)} != {sorted(expected)}"
    for name in expected:
        assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{where}, grad {name}: {m}")


def global_batch(step: int, rows: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reproducible query and key crops ``[rows, 3, size, size]`` of step ``step`` (rank r takes its slice)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(2, rows, 3, size, size, generator=generator).unbind(0)


def reference_for(model, cfg, world: int) -> ReferenceMoCo:
    """The reference started from ``model``'s current query encoder (and queue), with ``cfg``'s settings."""
    moco = cfg.moco
    queue = queue_and_pointer(model)[0] if moco.mechanism == "moco" else None
    splits = cfg.model.bn_splits if cfg.model.bn == "split" else 1
    return ReferenceMoCo(
        model.encoder_q.backbone,
        model.encoder_q.head,
        mechanism=moco.mechanism,
        world=world,
        batch=cfg.train.batch_size,
        temperature=moco.temperature,
        momentum=moco.momentum,
        queue=queue,
        splits=splits,
        symmetric=moco.symmetric,
    )
