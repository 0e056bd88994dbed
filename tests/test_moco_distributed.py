"""Two real gloo ranks (torch.multiprocessing, no Ray): the shuffle-BN collectives and one MoCo step per mechanism.

One spawn of two ranks runs every check (process start-up dominates); each rank asserts what it can see alone
and saves its tensors, and the tests compare the two ranks.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

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
        results = {"collectives": _collectives_worker(rank), "steps": _step_worker(rank)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _collectives_worker(rank):
    from mocolab.moco.mechanisms.queue import QueueDictionary
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
    queue = QueueDictionary(size=4 * BATCH, dim=4)
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
    from mocolab.moco.model import MoCo

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
        model = MoCo.from_config(cfg, num_train_samples=4 * WORLD * BATCH).train()
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
        out[f"{mechanism}/grad"] = torch.cat([g.flatten() for g in grads])
        out[f"{mechanism}/index"] = index
        for name, buf in model.dictionary.named_buffers():
            out[f"{mechanism}/{name}"] = buf
            if buf.dim() == 2:  # rows of the queue / bank this step wrote
                out[f"{mechanism}/{name}_changed"] = (buf != buffers_before[name]).any(dim=1).nonzero().flatten()
    return out


def test_one_two_worker_step_per_mechanism(ranks):
    r0, r1 = (r["steps"] for r in ranks)
    for mechanism in MECHANISMS:  # DDP averaged the gradients, whatever collectives ran inside the step
        assert torch.allclose(r0[f"{mechanism}/grad"], r1[f"{mechanism}/grad"], atol=1e-6)
    assert int(r0["moco/width"]) == 1 + 4 * BATCH
    assert torch.equal(r0["moco/queue"], r1["moco/queue"]) and int(r0["moco/queue_ptr"]) == WORLD * BATCH
    assert r0["moco/queue_changed"].tolist() == list(range(WORLD * BATCH))
    assert int(r0["end_to_end/width"]) == WORLD * BATCH  # K = global batch
    assert int(r0["memory_bank/width"]) == 1 + 4 * BATCH
    assert torch.equal(r0["memory_bank/bank"], r1["memory_bank/bank"])
    both_ranks_samples = sorted(torch.cat([r0["memory_bank/index"], r1["memory_bank/index"]]).tolist())
    assert r0["memory_bank/bank_changed"].tolist() == both_ranks_samples
