"""mocolab's MoCo step against the plain reference of tests/support/moco_reference.py on one process, two steps with SGD
between them (so the momentum update and the queue matter in the second): split BN (which samples share BN
statistics, for queries and shuffled keys) and the symmetric loss (which crops each direction pairs).
The two-rank comparisons (shuffle BN, end_to_end) are in test_moco_distributed.py."""

from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from moco_harness import (
    assert_grads_close,
    global_batch,
    grads_of,
    make_moco,
    queue_and_pointer,
    recorded_permutations,
    reference_for,
)
from torch.testing import assert_close

from mocolab.config import build_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH, SIZE, SPLITS, STEPS, LR = 8, 16, 2, 2, 0.5


def _cfg(**moco):
    return build_config(
        {
            "moco": {"dim": 8, "queue_size": 64, "momentum": 0.9, "temperature": 0.2, **moco},
            "model": {"arch": "small_cnn", "bn": "split", "bn_splits": SPLITS},
            "train": {"batch_size": BATCH},
            "scaling": {"num_workers": 1},
        }
    )


class Compared(NamedTuple):
    """One step of mocolab (permutations it drew, output, query-encoder gradients, queue and pointer after it) and
    of the reference given the same permutations (its step, gradients, queue rows and pointer after it)."""

    perms: list
    out: object
    grads: dict
    queue: torch.Tensor
    ptr: int
    expected: object
    expected_grads: dict
    expected_queue: torch.Tensor
    expected_ptr: int


def _steps(cfg) -> Iterator[Compared]:
    """Run mocolab and the reference side by side, plain SGD on both after each step."""
    torch.manual_seed(0)
    model = make_moco(cfg)
    reference = reference_for(model, cfg, world=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        im_q, im_k = global_batch(step, BATCH, SIZE)
        with recorded_permutations() as perms:
            out = model(im_q, im_k, torch.arange(BATCH))
        out.loss.backward()
        expected = reference.step(im_q, im_k, perms)
        expected.loss.backward()
        yield Compared(
            perms,
            out,
            grads_of(model.encoder_q),
            *queue_and_pointer(model),
            expected,
            grads_of(reference.f_q),
            reference.queue_rows.clone(),
            reference.ptr,
        )
        optimizer.step()
        optimizer.zero_grad()
        reference.sgd_step(LR)


def _assert_same_rows(actual, expected, where):
    """Equal up to the order of the rows (the order of keys within one step's block of the queue is no part of
    the algorithm)."""
    distance = torch.cdist(actual, expected)
    nearest = distance.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(len(expected))), f"{where}: rows are not a permutation"
    assert distance.min(dim=1).values.max() < 1e-5, f"{where}: rows differ by {distance.min(dim=1).values.max()}"


def test_split_bn_step_matches_the_reference():
    """Queries normalised per strided split of the batch, keys per strided split of the shuffled batch, then
    unshuffled: keys, logits, loss, queue, pointer and gradients equal the reference's."""
    for step, c in enumerate(_steps(_cfg())):
        where = f"step {step}"
        assert len(c.perms) == 1, f"{where}: model.bn=split drew {len(c.perms)} key permutations, expected 1"
        (direction,) = c.expected.directions
        enqueued = c.queue[step * BATCH : (step + 1) * BATCH]
        assert_close(enqueued, direction.k, atol=1e-5, rtol=0, msg=lambda m: f"{where}, keys: {m}")
        assert_close(c.out.logits, direction.logits, atol=1e-4, rtol=0, msg=lambda m: f"{where}, logits: {m}")
        loss = c.expected.rank_losses[0]
        assert_close(c.out.loss, loss, atol=1e-5, rtol=0, msg=lambda m: f"{where}, loss: {m}")
        assert_close(c.queue, c.expected_queue, atol=1e-5, rtol=0, msg=lambda m: f"{where}, queue: {m}")
        assert c.ptr == c.expected_ptr, f"{where}: queue_ptr {c.ptr} != {c.expected_ptr}"
        assert_grads_close(c.grads, c.expected_grads, where)


def test_symmetric_directions_pair_each_query_crop_with_the_other_crops_key():
    """Direction 1 is q(crop 1) . k(crop 2), direction 2 is q(crop 2) . k(crop 1), both against the queue as it
    was before the step; both directions' keys enter the queue. Per-direction logits (positives exactly, the
    negatives as a set per row), the loss from them and the gradients equal the reference's."""
    for step, c in enumerate(_steps(_cfg(symmetric=True))):
        where = f"step {step}"
        assert len(c.perms) == 2, f"{where}: drew {len(c.perms)} key permutations, expected one per direction"
        for d, direction in enumerate(c.expected.directions):
            logits, want = c.out.logits[d * BATCH : (d + 1) * BATCH], direction.logits.detach()
            at = f"{where}, direction {d + 1}"
            assert_close(logits[:, 0], want[:, 0], atol=1e-4, rtol=0, msg=lambda m: f"{at}, positives: {m}")
            assert_close(
                logits[:, 1:].sort(dim=1).values,
                want[:, 1:].sort(dim=1).values,
                atol=1e-4,
                rtol=0,
                msg=lambda m: f"{at}, negatives: {m}",
            )
        loss = c.expected.rank_losses[0]
        assert_close(c.out.loss, loss, atol=1e-5, rtol=0, msg=lambda m: f"{where}, loss: {m}")
        written = (step + 1) * 2 * BATCH
        for block in range(0, written, 2 * BATCH):  # each step's keys, both directions'
            rows = slice(block, block + 2 * BATCH)
            _assert_same_rows(c.queue[rows], c.expected_queue[rows], f"{where}, keys enqueued at row {block}")
        assert_close(c.queue[written:], c.expected_queue[written:], atol=0, rtol=0, msg=lambda m: f"{where}: {m}")
        assert c.ptr == c.expected_ptr, f"{where}: queue_ptr {c.ptr} != {c.expected_ptr}"
        assert_grads_close(c.grads, c.expected_grads, where)
