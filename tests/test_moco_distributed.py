"""Two real gloo ranks (torch.multiprocessing, no Ray): the shuffle-BN collectives, one MoCo step per mechanism,
and two steps of moco and end_to_end (shuffle BN) compared with the plain reference of tests/moco_reference.py.

One spawn of two ranks runs every check (process start-up dominates); each rank asserts what it can see alone
and saves its tensors, and the tests compare the two ranks (and the reference, run here on the global batch).
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from moco_harness import (
    assert_grads_close,
    global_batch,
    grads_of,
    make_moco,
    queue_and_pointer,
    recorded_permutations,
    reference_for,
)

WORLD, BATCH = 2, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' saved results of :func:`_collectives_worker` and :func:`_step_worker`."""
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {
            "collectives": _collectives_worker(rank),
            "steps": _step_worker(rank),
            "fidelity": {mechanism: _fidelity_worker(rank, mechanism) for mechanism in FIDELITY},
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _collectives_worker(rank):
    from mocolab.moco.dictionary import QueueDictionary
    from mocolab.moco.distributed import (
        gather_all,
        gather_all_with_grad,
        shuffle_across_workers,
        unshuffle_across_workers,
    )

    torch.manual_seed(100 + rank)  # different local RNGs: only rank 0's permutation may be used
    ids = torch.arange(BATCH, dtype=torch.float32) + 100 * rank  # sample i of rank r is r * 100 + i
    images = ids.view(BATCH, 1, 1, 1).expand(BATCH, 3, 2, 2).contiguous()

    gathered = gather_all(ids)
    assert gathered.tolist() == [float(i + 100 * r) for r in range(WORLD) for i in range(BATCH)]

    shuffled, unshuffle = shuffle_across_workers(images)
    assert shuffled.shape == images.shape
    assert torch.equal(unshuffle_across_workers(shuffled, unshuffle), images)  # shuffle then unshuffle = identity

    # with gradient: every row's gradient returns to the rank that computed it, from every rank's loss
    scale = torch.ones((), requires_grad=True)
    unshuffle_across_workers(scale * shuffled, unshuffle).sum().backward()
    assert torch.isclose(scale.grad, shuffled.sum())

    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    weights = torch.arange(WORLD * 2, dtype=torch.float32).view(-1, 1) * (rank + 1)
    (gather_all_with_grad(x) * weights).sum().backward()  # rank r's rows get sum over ranks of their weights
    rows = torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32).view(-1, 1)
    assert torch.allclose(x.grad, (rows * sum(r + 1 for r in range(WORLD))).expand(2, 3))

    torch.manual_seed(0)  # the same initial queue on both ranks, as the training loop seeds them
    queue = QueueDictionary(size=4 * BATCH, dim=4, keys_per_step=WORLD * BATCH)
    keys = F.normalize(torch.randn(BATCH, 4) + rank, dim=1)
    queue([F.normalize(torch.randn(BATCH, 4), dim=1)], [keys], None, 0.2)
    return {"shuffled_ids": shuffled[:, 0, 0, 0], "unshuffle": unshuffle, "keys": keys, "queue": queue.queue}


def test_shuffle_unshuffle_and_queue_across_two_gloo_ranks(ranks):
    results = [r["collectives"] for r in ranks]
    ids = torch.cat([r["shuffled_ids"] for r in results])
    assert sorted(ids.tolist()) == sorted(float(i + 100 * r) for r in range(WORLD) for i in range(BATCH))
    assert torch.equal(results[0]["unshuffle"], results[1]["unshuffle"])  # rank 0's permutation, broadcast
    for r in results:  # each rank's shuffled keys mix both ranks' images
        origins = set((r["shuffled_ids"] // 100).int().tolist())
        assert origins == {0, 1}
    # keys gathered before enqueue: identical queues holding rank 0's then rank 1's keys
    assert torch.equal(results[0]["queue"], results[1]["queue"])
    assert torch.equal(results[0]["queue"][: WORLD * BATCH], torch.cat([r["keys"] for r in results]))


MECHANISMS = ("moco", "end_to_end", "memory_bank")


def _step_worker(rank):
    from torch.nn.parallel import DistributedDataParallel

    from mocolab.config import build_config

    out = {}
    for mechanism in MECHANISMS:
        moco = {"mechanism": mechanism, "dim": 8}
        if mechanism != "end_to_end":
            moco["queue_size"] = 4 * BATCH
        cfg = build_config(
            {
                "moco": moco,
                "model": {"arch": "small_cnn", "bn": "shuffle"},
                "train": {"batch_size": BATCH},
                "scaling": {"num_workers": WORLD},
            }
        )
        torch.manual_seed(0)
        model = make_moco(cfg, num_train_samples=4 * WORLD * BATCH)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)  # as the training loop wraps it
        torch.manual_seed(1 + rank)
        im_q, im_k = torch.randn(2, BATCH, 3, 12, 12).unbind(0)
        index = torch.arange(BATCH) * WORLD + rank
        buffers_before = {name: buf.clone() for name, buf in model.dictionary.named_buffers()}
        result = ddp(im_q, im_k, index)
        result.loss.backward()
        assert torch.isfinite(result.loss)
        grads = [p.grad for p in model.encoder_q.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        out[f"{mechanism}/width"] = torch.tensor(result.logits.shape[1])
        out[f"{mechanism}/index"] = index
        for name, buf in model.dictionary.named_buffers():
            out[f"{mechanism}/{name}"] = buf
            if buf.dim() == 2:  # rows of the queue / bank this step wrote
                out[f"{mechanism}/{name}_changed"] = (buf != buffers_before[name]).any(dim=1).nonzero().flatten()
    return out


def test_one_two_worker_step_per_mechanism(ranks):
    """Shapes and dictionary updates. The step's values and gradients (which DDP makes equal on both ranks whatever
    the step computed) are compared with the reference below, for moco and end_to_end."""
    r0, r1 = (r["steps"] for r in ranks)
    assert int(r0["moco/width"]) == 1 + 4 * BATCH
    assert torch.equal(r0["moco/queue"], r1["moco/queue"]) and int(r0["moco/queue_ptr"]) == WORLD * BATCH
    assert r0["moco/queue_changed"].tolist() == list(range(WORLD * BATCH))
    assert int(r0["end_to_end/width"]) == WORLD * BATCH  # K = global batch
    assert int(r0["memory_bank/width"]) == 1 + 4 * BATCH
    assert torch.equal(r0["memory_bank/bank"], r1["memory_bank/bank"])
    both_ranks_samples = sorted(torch.cat([r0["memory_bank/index"], r1["memory_bank/index"]]).tolist())
    assert r0["memory_bank/bank_changed"].tolist() == both_ranks_samples


# Two steps (SGD between them, so that the momentum update and the queue matter in the second) of moco and
# end_to_end with shuffle BN, each rank's results compared with the reference given rank 0's permutations.
FIDELITY, STEPS, SIZE, LR = ("moco", "end_to_end"), 2, 12, 0.5


def _fidelity_cfg(mechanism):
    from mocolab.config import build_config

    moco = {"mechanism": mechanism, "dim": 8, "momentum": 0.9, "temperature": 0.2}
    if mechanism == "moco":
        moco["queue_size"] = 4 * WORLD * BATCH
    return build_config(
        {
            "moco": moco,
            "model": {"arch": "small_cnn", "bn": "shuffle"},
            "train": {"batch_size": BATCH},
            "scaling": {"num_workers": WORLD},
        }
    )


def _fidelity_worker(rank, mechanism):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = make_moco(_fidelity_cfg(mechanism))
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    torch.manual_seed(10 + rank)  # different local RNGs: only rank 0's permutation may be used
    steps = []
    for step in range(STEPS):
        im_q, im_k = (x[rank * BATCH : (rank + 1) * BATCH] for x in global_batch(step, WORLD * BATCH, SIZE))
        with recorded_permutations() as perms:
            out = ddp(im_q, im_k, torch.arange(BATCH) + rank * BATCH)
        out.loss.backward()
        record = {"perms": perms, "loss": out.loss.detach(), "logits": out.logits.detach()}
        record["grads"] = grads_of(model.encoder_q)
        if mechanism == "moco":
            record["queue"], record["queue_ptr"] = queue_and_pointer(model)
        steps.append(record)
        optimizer.step()
        optimizer.zero_grad()
    return {"initial": initial, "steps": steps}


def _reference_steps(ranks, mechanism):
    """The reference started from rank 0's initial model, run on the same global batches and permutations."""
    cfg = _fidelity_cfg(mechanism)
    model = make_moco(cfg)
    model.load_state_dict(ranks[0]["fidelity"][mechanism]["initial"])
    reference = reference_for(model, cfg, world=WORLD)
    results = []
    for step, record in enumerate(ranks[0]["fidelity"][mechanism]["steps"]):
        im_q, im_k = global_batch(step, WORLD * BATCH, SIZE)
        result = reference.step(im_q, im_k, record["perms"])
        result.loss.backward()
        grads = grads_of(reference.f_q)
        queue = (reference.queue_rows.clone(), reference.ptr) if mechanism == "moco" else None
        results.append((result, grads, queue))
        reference.sgd_step(LR)
    return results


def _assert_shuffled_once_per_step(ranks, mechanism):
    for r, rank in enumerate(ranks):
        for step, record in enumerate(rank["fidelity"][mechanism]["steps"]):
            assert len(record["perms"]) == 1, (
                f"rank {r} step {step}: model.bn=shuffle drew {len(record['perms'])} key permutations, expected 1"
            )


@pytest.mark.usefixtures("one_torch_thread")
def test_two_rank_moco_shuffle_bn_steps_match_the_reference(ranks):
    """Per rank and step: keys (the rows enqueued), logits and loss before DDP averaging, queue and pointer, and
    the gradient DDP leaves, against the reference (shuffle, per-rank key BN, unshuffle, enqueue, momentum)."""
    _assert_shuffled_once_per_step(ranks, "moco")
    for step, (expected, grads, (queue, ptr)) in enumerate(_reference_steps(ranks, "moco")):
        (direction,) = expected.directions
        for r, rank in enumerate(ranks):
            got = rank["fidelity"]["moco"]["steps"][step]
            where = f"rank {r} step {step}"
            start = step * WORLD * BATCH
            enqueued = got["queue"][start : start + WORLD * BATCH]
            assert_close(enqueued, direction.k, atol=1e-5, rtol=0, msg=lambda m: f"{where}, keys: {m}")
            assert_close(
                got["logits"], direction.logits[r * BATCH : (r + 1) * BATCH], atol=1e-4, rtol=0,
                msg=lambda m: f"{where}, logits: {m}",
            )
            loss = expected.rank_losses[r].detach()
            assert_close(got["loss"], loss, atol=1e-5, rtol=0, msg=lambda m: f"{where}, loss before DDP: {m}")
            assert_close(got["queue"], queue, atol=1e-5, rtol=0, msg=lambda m: f"{where}, queue: {m}")
            assert got["queue_ptr"] == ptr, f"{where}: queue_ptr {got['queue_ptr']} != {ptr}"
        for r, rank in enumerate(ranks):  # after every rank's forward values, which say more when they differ
            assert_grads_close(rank["fidelity"]["moco"]["steps"][step]["grads"], grads, f"rank {r} step {step}")


@pytest.mark.usefixtures("one_torch_thread")
def test_two_rank_end_to_end_positives_are_each_ranks_own_keys(ranks):
    """Per rank and step: the positive (column 0) of query i on rank r is its own key, r * B + i of the global batch
    of keys, the other columns are the rest of that batch; loss before DDP averaging and the averaged gradient."""
    _assert_shuffled_once_per_step(ranks, "end_to_end")
    for step, (expected, grads, _) in enumerate(_reference_steps(ranks, "end_to_end")):
        (direction,) = expected.directions
        logits = direction.logits.detach()
        for r, rank in enumerate(ranks):
            got = rank["fidelity"]["end_to_end"]["steps"][step]
            where = f"rank {r} step {step}"
            own = torch.arange(r * BATCH, (r + 1) * BATCH)
            assert_close(
                got["logits"][:, 0], logits[own, own], atol=1e-4, rtol=0, msg=lambda m: f"{where}, positives: {m}"
            )
            assert_close(
                got["logits"].sort(dim=1).values, logits[own].sort(dim=1).values, atol=1e-4, rtol=0,
                msg=lambda m: f"{where}, all logits of each query: {m}",
            )
            loss = expected.rank_losses[r].detach()
            assert_close(got["loss"], loss, atol=1e-5, rtol=0, msg=lambda m: f"{where}, loss before DDP: {m}")
        for r, rank in enumerate(ranks):
            assert_grads_close(rank["fidelity"]["end_to_end"]["steps"][step]["grads"], grads, f"rank {r} step {step}")
