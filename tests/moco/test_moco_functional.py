"""The pure math of a MoCo step (mocolab.moco.functional)."""

import pytest
import torch
import torch.nn.functional as F

from mocolab.moco.functional import (
    enqueue_,
    in_batch_logits,
    infonce_logits,
    infonce_loss,
    inverse_permutation,
    memory_bank_update_,
    momentum_update_,
    shuffle_permutation,
    shuffle_plan,
)


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def _params():
    return [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]


def test_momentum_zero_copies_the_source_exactly():
    target, source = _params()
    momentum_update_(target, source, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(target, source))


def test_momentum_one_keeps_the_target_exactly():
    target, source = _params()
    before = [t.clone() for t in target]
    momentum_update_(target, source, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before))


def test_momentum_general_formula():
    target, source = _params()
    expected = [0.9 * t + 0.1 * s for t, s in zip(target, source)]
    momentum_update_(target, source, 0.9)
    assert all(torch.allclose(t, e, atol=1e-6) for t, e in zip(target, expected))


def test_momentum_refuses_lists_of_different_length():
    target, source = _params()
    with pytest.raises(ValueError, match="1 target vs 2 source"):
        momentum_update_(target[:1], source, 0.5)


def test_enqueue_is_fifo_and_wraps_to_the_oldest_rows():
    queue = torch.zeros(6, 2)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]
    ptr = 0
    for batch in batches[:3]:
        ptr = enqueue_(queue, ptr, batch)
    assert ptr == 0  # full: the pointer wrapped
    assert queue[:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    ptr = enqueue_(queue, ptr, batches[3])  # overwrites the oldest batch only
    assert ptr == 2
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]


def test_enqueue_refuses_a_queue_that_is_not_a_multiple_of_the_batch():
    with pytest.raises(ValueError, match="multiple of the key batch 4"):
        enqueue_(torch.zeros(6, 2), 0, torch.ones(4, 2))


def test_enqueue_refuses_keys_of_another_dim():
    with pytest.raises(ValueError, match="do not fit"):
        enqueue_(torch.zeros(6, 2), 0, torch.ones(2, 3))


def test_infonce_logits_put_the_positive_at_column_zero():
    q, k, negatives = _unit(4, 8), _unit(4, 8), _unit(10, 8)
    logits, labels = infonce_logits(q, k, negatives, 0.2)
    assert logits.shape == (4, 11)
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.2, atol=1e-6)
    assert torch.allclose(logits[:, 1:], q @ negatives.T / 0.2, atol=1e-6)
    assert labels.dtype == torch.long and not labels.any()


def test_infonce_logits_accept_negatives_in_row_blocks():
    q, k, negatives = _unit(4, 8), _unit(4, 8), _unit(10, 8)
    whole, _ = infonce_logits(q, k, negatives, 0.1)
    pieces, _ = infonce_logits(q, k, (negatives[:3], negatives[3:3], negatives[3:]), 0.1)
    assert torch.allclose(whole, pieces)


def test_infonce_loss_is_cross_entropy_with_target_zero():
    q, k, negatives = _unit(4, 8), _unit(4, 8), _unit(10, 8)
    logits, labels = infonce_logits(q, k, negatives, 0.07)
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(infonce_loss(logits, labels), expected)
    assert torch.allclose(infonce_loss(logits), expected)


def test_in_batch_logits_put_each_own_key_first_and_the_others_in_order():
    q, keys = _unit(3, 8), _unit(6, 8)
    own = torch.tensor([2, 3, 4])  # e.g. rank 1 of 2 with batch 3 would own rows 3..5
    logits, labels = in_batch_logits(q, keys, own, 0.5)
    full = q @ keys.T / 0.5
    assert logits.shape == (3, 6) and not labels.any()
    for i, p in enumerate(own.tolist()):
        others = [j for j in range(6) if j != p]
        assert torch.allclose(logits[i], full[i, [p] + others])


def test_memory_bank_update_changes_exactly_the_given_rows():
    bank, keys = _unit(8, 4), _unit(3, 4)
    index = torch.tensor([5, 0, 2])
    before = bank.clone()
    memory_bank_update_(bank, index, keys, 0.5)
    expected = F.normalize(0.5 * before[index] + 0.5 * keys, dim=1)
    assert torch.allclose(bank[index], expected, atol=1e-6)
    untouched = [i for i in range(8) if i not in index.tolist()]
    assert torch.equal(bank[untouched], before[untouched])


def test_inverse_permutation_undoes_the_shuffle():
    x = torch.randn(7, 3)
    perm = shuffle_permutation(7, torch.Generator().manual_seed(1))
    assert sorted(perm.tolist()) == list(range(7))
    assert torch.equal(x[perm][inverse_permutation(perm)], x)


def test_shuffle_permutation_follows_its_generator():
    a = shuffle_permutation(50, torch.Generator().manual_seed(3))
    b = shuffle_permutation(50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, torch.arange(50))


def _simulated_all_to_all(sent, send_counts):
    """What every rank receives when rank ``s`` sends ``sent[s]`` split by ``send_counts[s]`` (one process)."""
    pieces = [list(x.split(counts)) for x, counts in zip(sent, send_counts)]
    return [torch.cat([pieces[source][dest] for source in range(len(sent))]) for dest in range(len(sent))]


@pytest.mark.parametrize("world, batch", [(1, 5), (2, 4), (4, 3), (8, 2)])
@pytest.mark.parametrize("kind", ["random", "identity", "reversed", "rolled"])
def test_shuffle_plan_gives_the_gather_shuffle_and_its_inverse_moving_only_foreign_rows(world, batch, kind):
    n = world * batch
    perm = {
        "random": shuffle_permutation(n, torch.Generator().manual_seed(world)),
        "identity": torch.arange(n),  # nothing travels
        "reversed": torch.arange(n).flip(0),
        "rolled": torch.arange(n).roll(batch),  # every row travels, all to one rank
    }[kind]
    everything = torch.arange(n * 2, dtype=torch.float32).view(n, 2)  # row g = sample g (rank g // batch)
    local = list(everything.split(batch))
    plans = [shuffle_plan(perm, world, r) for r in range(world)]
    for p in plans:  # the split sizes agree pairwise: what s sends to r is what r receives from s
        assert sum(p.send_counts) == sum(p.recv_counts) == batch
    assert [[p.send_counts[r] for p in plans] for r in range(world)] == [p.recv_counts for p in plans]

    received = _simulated_all_to_all([x[p.send_rows] for x, p in zip(local, plans)], [p.send_counts for p in plans])
    shuffled = [got[p.from_arrival] for got, p in zip(received, plans)]
    assert torch.equal(torch.cat(shuffled), everything[perm])  # the gather shuffle's slices

    returned = _simulated_all_to_all(
        [y[p.arrival_slots] for y, p in zip(shuffled, plans)], [p.recv_counts for p in plans]
    )
    assert torch.equal(torch.cat([got[p.from_return] for got, p in zip(returned, plans)]), everything)

    # rows received from other workers = rows whose slot is on another worker than their sample
    foreign = sum(batch - p.recv_counts[r] for r, p in enumerate(plans))
    assert foreign == int((perm // batch != torch.arange(n) // batch).sum())


def test_shuffle_plan_refuses_a_permutation_that_does_not_split_evenly():
    with pytest.raises(ValueError, match="cannot split into 3 equal batches"):
        shuffle_plan(torch.arange(8), world=3, rank=0)
