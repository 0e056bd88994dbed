"""Real gloo ranks (torch.multiprocessing, no Ray): the gathers, the shuffle-BN shuffle (all-to-all against the
official all-gather, on 2 and 4 ranks), one MoCo step per mechanism, and two steps of moco and end_to_end (shuffle
BN) compared with the plain reference of tests/support/moco_reference.py.

One start of the ranks per world size runs every check of that size; the ranks are forked from a clean fork server
that has imported everything they use once (spawned ranks would each import torch and mocolab again, which dominated
the test's time; ranks forked from the test process itself fail once an earlier test has started autograd's threads
there). Each rank asserts what it can see alone and saves its tensors, and the tests compare the ranks
(and the reference, run here on the global batch).
"""

import contextlib
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from moco_harness import (
    assert_grads_close,
    global_batch,
    grads_of,
    make_moco,
    queue_and_pointer,
    recorded_permutations,
    reference_for,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from mocolab.config import build_config
from mocolab.moco import distributed
from mocolab.moco import model as model_module
from mocolab.moco.distributed import gather_all, gather_all_with_grad
from mocolab.moco.mechanisms.queue import QueueDictionary

WORLD, BATCH, DIM = 2, 8, 8
PERMUTATIONS = ("random", "identity", "rolled")  # identity: nothing travels; rolled: all of it, to one rank
IMPLS = ("all_to_all", "gather")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, out_dir):
    mp.get_context("forkserver").set_forkserver_preload([__name__])  # no effect if a server already runs: still right
    mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, start_method="forkserver")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' saved results of every check (:func:`_worker`)."""
    return _spawn(WORLD, tmp_path_factory.mktemp("gloo2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """Four ranks' saved results of the shuffle checks."""
    return _spawn(4, tmp_path_factory.mktemp("gloo4"))


@pytest.fixture(params=[2, 4], ids=lambda w: f"{w}workers")
def shuffle_results(request):
    """Every rank's shuffle results, on 2 and on 4 ranks."""
    return [r["shuffle"] for r in request.getfixturevalue("ranks" if request.param == WORLD else "four_ranks")]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {"shuffle": _shuffle_worker(rank, world)}
        if world == WORLD:
            results.update(collectives=_collectives_worker(rank), steps=_step_worker(rank))
            results["fidelity"] = {mechanism: _fidelity_worker(rank, mechanism) for mechanism in FIDELITY}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _implementation(impl):
    if impl == "all_to_all":
        return distributed.shuffle_across_workers, distributed.unshuffle_across_workers
    return distributed.shuffle_by_gather, distributed.unshuffle_by_gather


def _permutation_drawn(kind, world):
    """The shuffles draw ``kind``'s permutation: rank 0's random one (each rank's RNG differs), or a fixed one."""
    n = world * BATCH
    fixed = {"identity": torch.arange(n), "rolled": torch.arange(n).roll(BATCH)}.get(kind)
    if fixed is None:
        return contextlib.nullcontext()
    return mock.patch.object(distributed, "shuffle_permutation", lambda n, device=None: fixed.clone())


def _shuffle_worker(rank, world):
    """Both shuffles for each permutation kind, and an end-to-end MoCo step with each."""
    out = {}
    for kind in PERMUTATIONS:
        for impl in IMPLS:
            out.update({f"{kind}/{impl}/{k}": v for k, v in _shuffle_checks(rank, world, kind, impl).items()})
    for impl in IMPLS:
        out.update({f"moco/{impl}/{k}": v for k, v in _end_to_end_step(rank, world, impl).items()})
    return out


def _shuffle_checks(rank, world, kind, impl):
    """``impl``'s shuffle of random images, a BN encoder on the shuffled batch, unshuffled keys with gradients."""
    shuffle, unshuffle = _implementation(impl)
    torch.manual_seed(100 + rank)  # different RNGs per rank: only rank 0's permutation may count
    images = torch.randn(BATCH, 3, 5, 5, generator=torch.Generator().manual_seed(rank))
    with _permutation_drawn(kind, world):
        shuffled, undo = shuffle(images)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, DIM))
    keys = unshuffle(F.normalize(encoder(shuffled), dim=1), undo)  # batch statistics over the shuffled batch
    # an end-to-end style loss: each rank's queries against every rank's keys, so gradients cross ranks twice
    queries = F.normalize(torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(50 + rank)), dim=1)
    negatives = distributed.gather_all_with_grad(keys)
    F.cross_entropy(queries @ negatives.T / 0.2, torch.arange(BATCH) + rank * BATCH).backward()

    # gradient routing: row j of the shuffled batch holds global sample perm[rank * B + j]; the loss of that
    # sample's owner weighs it by (sample + 1), so its gradient must come back as exactly that weight
    rows = torch.zeros(BATCH, 2, requires_grad=True)
    weights = (torch.arange(BATCH, dtype=torch.float32) + rank * BATCH + 1).view(-1, 1).expand(BATCH, 2)
    (unshuffle(rows * 1.0, undo) * weights).sum().backward()
    return {
        "images": images,
        "shuffled": shuffled,
        "identity": unshuffle(shuffled, undo),
        "keys": keys.detach(),
        "grads": torch.cat([p.grad.flatten() for p in encoder.parameters()]),
        "row_grads": rows.grad[:, 0],
    }


def _end_to_end_step(rank, world, impl):
    """One end-to-end MoCo step (keys from encoder_q with gradient) with ``impl``'s shuffle in the model."""

    cfg = build_config(
        {
            "moco": {"mechanism": "end_to_end", "dim": DIM},
            "model": {"arch": "small_cnn", "bn": "shuffle"},
            "train": {"batch_size": BATCH},
            "scaling": {"num_workers": world},
        }
    )
    torch.manual_seed(0)
    moco = make_moco(cfg, num_train_samples=world * BATCH)
    torch.manual_seed(1 + rank)
    im_q, im_k = torch.randn(2, BATCH, 3, 12, 12).unbind(0)
    shuffle, unshuffle = _implementation(impl)
    with mock.patch.multiple(model_module, shuffle_across_workers=shuffle, unshuffle_across_workers=unshuffle):
        result = moco(im_q, im_k, torch.arange(BATCH) + rank * BATCH)
    result.loss.backward()  # no DDP: each rank's own gradient, which wrong routing would change
    return {
        "loss": result.loss.detach(),
        "grads": torch.cat([p.grad.flatten() for p in moco.encoder_q.parameters()]),
    }


def _permutation(results, kind):
    """The global permutation both implementations used, read back from the shuffled images."""
    everything = torch.cat([r[f"{kind}/gather/images"] for r in results])
    shuffled = torch.cat([r[f"{kind}/gather/shuffled"] for r in results])
    flat, rows = everything.flatten(1), shuffled.flatten(1)
    return torch.tensor([int((flat == row).all(dim=1).nonzero()) for row in rows])


@pytest.mark.parametrize("kind", PERMUTATIONS)
def test_all_to_all_shuffle_equals_the_gather_shuffle_and_unshuffle_undoes_it(shuffle_results, kind):
    world = len(shuffle_results)
    perm = _permutation(shuffle_results, kind)
    assert sorted(perm.tolist()) == list(range(world * BATCH))
    if kind == "random":  # rank 0's permutation mixes the ranks
        assert (perm // BATCH != torch.arange(world * BATCH) // BATCH).any()
    for rank, r in enumerate(shuffle_results):
        assert torch.equal(r[f"{kind}/all_to_all/shuffled"], r[f"{kind}/gather/shuffled"]), f"rank {rank}"
        for impl in IMPLS:
            assert torch.equal(r[f"{kind}/{impl}/identity"], r[f"{kind}/{impl}/images"]), f"{impl} rank {rank}"


@pytest.mark.parametrize("kind", PERMUTATIONS)
def test_all_to_all_unshuffle_gives_the_gather_keys_and_gradients(shuffle_results, kind):
    perm = _permutation(shuffle_results, kind)
    for rank, r in enumerate(shuffle_results):
        assert torch.equal(r[f"{kind}/all_to_all/keys"], r[f"{kind}/gather/keys"]), f"rank {rank}"
        assert torch.equal(r[f"{kind}/all_to_all/grads"], r[f"{kind}/gather/grads"]), f"rank {rank}"
        expected = (perm[rank * BATCH : (rank + 1) * BATCH] + 1).float()  # back to the row's sample's weight
        for impl in IMPLS:
            assert torch.equal(r[f"{kind}/{impl}/row_grads"], expected), f"{impl} rank {rank}"


def test_end_to_end_moco_step_has_the_same_loss_and_gradients_with_either_shuffle(shuffle_results):
    for rank, r in enumerate(shuffle_results):
        assert torch.isfinite(r["moco/all_to_all/loss"])
        assert torch.equal(r["moco/all_to_all/loss"], r["moco/gather/loss"]), f"rank {rank}"
        assert torch.equal(r["moco/all_to_all/grads"], r["moco/gather/grads"]), f"rank {rank}"
    assert not torch.equal(shuffle_results[0]["moco/all_to_all/grads"], shuffle_results[1]["moco/all_to_all/grads"])


def _collectives_worker(rank):
    ids = torch.arange(BATCH, dtype=torch.float32) + 100 * rank  # sample i of rank r is r * 100 + i

    gathered = gather_all(ids)
    assert gathered.tolist() == [float(i + 100 * r) for r in range(WORLD) for i in range(BATCH)]

    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    weights = torch.arange(WORLD * 2, dtype=torch.float32).view(-1, 1) * (rank + 1)
    (gather_all_with_grad(x) * weights).sum().backward()  # rank r's rows get sum over ranks of their weights
    rows = torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32).view(-1, 1)
    assert torch.allclose(x.grad, (rows * sum(r + 1 for r in range(WORLD))).expand(2, 3))

    torch.manual_seed(0)  # the same initial queue on both ranks, as the training loop seeds them
    queue = QueueDictionary(size=4 * BATCH, dim=4)
    keys = F.normalize(torch.randn(BATCH, 4) + rank, dim=1)
    queue([F.normalize(torch.randn(BATCH, 4), dim=1)], [keys], None, 0.2)
    return {"keys": keys, "queue": queue.queue}


def test_gathers_and_queue_across_two_gloo_ranks(ranks):
    results = [r["collectives"] for r in ranks]
    # keys gathered before enqueue: identical queues holding rank 0's then rank 1's keys
    assert torch.equal(results[0]["queue"], results[1]["queue"])
    assert torch.equal(results[0]["queue"][: WORLD * BATCH], torch.cat([r["keys"] for r in results]))


MECHANISMS = ("moco", "end_to_end", "memory_bank")


def _step_worker(rank):
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
                got["logits"],
                direction.logits[r * BATCH : (r + 1) * BATCH],
                atol=1e-4,
                rtol=0,
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
                got["logits"].sort(dim=1).values,
                logits[own].sort(dim=1).values,
                atol=1e-4,
                rtol=0,
                msg=lambda m: f"{where}, all logits of each query: {m}",
            )
            loss = expected.rank_losses[r].detach()
            assert_close(got["loss"], loss, atol=1e-5, rtol=0, msg=lambda m: f"{where}, loss before DDP: {m}")
        for r, rank in enumerate(ranks):
            assert_grads_close(rank["fidelity"]["end_to_end"]["steps"][step]["grads"], grads, f"rank {r} step {step}")
