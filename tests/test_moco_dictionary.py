"""The three dictionaries of moco.mechanism, on one worker (mocolab.moco.dictionary)."""

import pytest
import torch
import torch.nn.functional as F

from mocolab.config import ConfigError, build_config
from mocolab.moco.dictionary import (
    EndToEndDictionary,
    MemoryBankDictionary,
    QueueDictionary,
    build_dictionary,
    check_mechanism,
)
from mocolab.moco.functional import infonce_logits

T = 0.2


def _unit(*shape, grad=False):
    return F.normalize(torch.randn(*shape), dim=-1).requires_grad_(grad)


def test_queue_logits_use_the_queue_before_the_step_and_enqueue_the_keys():
    torch.manual_seed(0)
    dictionary = QueueDictionary(size=8, dim=4, keys_per_step=2)
    for _ in range(3):  # move the pointer off 0 so that the evicted rows sit in the middle
        dictionary([_unit(2, 4)], [_unit(2, 4)], None, T)
    assert int(dictionary.queue_ptr) == 6
    queue_before = dictionary.queue.clone()
    q, k = _unit(2, 4, grad=True), _unit(2, 4)
    logits, labels = dictionary([q], [k], None, T)
    expected, _ = infonce_logits(q, k, queue_before, T)
    assert logits.shape == (2, 9) and not labels.any()
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.equal(dictionary.queue[6:], k) and torch.equal(dictionary.queue[:6], queue_before[:6])
    assert int(dictionary.queue_ptr) == 0


def test_queue_gradient_is_that_of_the_queue_before_the_step():
    torch.manual_seed(1)
    dictionary = QueueDictionary(size=6, dim=4, keys_per_step=3)
    q, k = _unit(3, 4, grad=True), _unit(3, 4)
    queue_before = dictionary.queue.clone()
    F.cross_entropy(*dictionary([q], [k], None, T)).backward()  # the in-place enqueue must not break backward
    q_ref = q.detach().clone().requires_grad_(True)
    F.cross_entropy(*infonce_logits(q_ref, k, queue_before, T)).backward()
    assert torch.allclose(q.grad, q_ref.grad, atol=1e-6)


def test_queue_two_directions_enqueue_both_key_sets():
    dictionary = QueueDictionary(size=8, dim=4, keys_per_step=4)
    k1, k2 = _unit(2, 4), _unit(2, 4)
    logits, labels = dictionary([_unit(2, 4), _unit(2, 4)], [k1, k2], None, T)
    assert logits.shape == (4, 9) and labels.shape == (4,)
    assert torch.equal(dictionary.queue[:4], torch.cat([k1, k2])) and int(dictionary.queue_ptr) == 4


def test_queue_pointer_is_restored_by_load_state_dict():
    source = QueueDictionary(size=8, dim=4)
    source([_unit(2, 4)], [_unit(2, 4)], None, T)
    restored = QueueDictionary(size=8, dim=4)
    restored.load_state_dict(source.state_dict())
    k = _unit(2, 4)
    restored([_unit(2, 4)], [k], None, T)
    assert torch.equal(restored.queue[2:4], k) and int(restored.queue_ptr) == 4


def test_queue_refuses_a_size_that_is_not_a_multiple_of_the_keys_per_step():
    with pytest.raises(ValueError, match="moco.queue_size=10 is not a multiple of the 4 keys"):
        QueueDictionary(size=10, dim=4, keys_per_step=4)


def test_end_to_end_logits_are_the_batch_with_gradient_to_the_keys():
    q, k = _unit(4, 8, grad=True), _unit(4, 8, grad=True)
    logits, labels = EndToEndDictionary()([q], [k], None, T)
    assert logits.shape == (4, 4) and not labels.any()  # K = batch: 1 positive + 3 negatives
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / T, atol=1e-6)
    F.cross_entropy(logits, labels).backward()
    assert k.grad is not None and k.grad.abs().sum() > 0


def test_memory_bank_draws_k_negatives_and_updates_exactly_the_step_rows():
    torch.manual_seed(2)
    dictionary = MemoryBankDictionary(num_samples=20, dim=4, num_negatives=6, momentum=0.5)
    bank_before = dictionary.bank.clone()
    q, k = _unit(3, 4, grad=True), _unit(3, 4)
    index = torch.tensor([7, 0, 13])
    logits, labels = dictionary([q], [k], index, T)
    assert logits.shape == (3, 7) and not labels.any()
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / T, atol=1e-6)
    changed = (dictionary.bank != bank_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 7, 13]
    assert torch.allclose(dictionary.bank[index], F.normalize(0.5 * bank_before[index] + 0.5 * k, dim=1), atol=1e-6)
    assert torch.allclose(dictionary.bank.norm(dim=1), torch.ones(20), atol=1e-5)


def test_memory_bank_negatives_are_rows_of_the_bank_before_the_update():
    torch.manual_seed(3)
    dictionary = MemoryBankDictionary(num_samples=5, dim=5, num_negatives=5)
    bank_before = dictionary.bank.clone()
    q = torch.eye(5)[:1]  # one-hot query: its logits read one coordinate of each negative
    logits, _ = dictionary([q], [_unit(1, 5)], torch.tensor([0]), 1.0)
    column_values = logits[0, 1:]
    assert all(torch.isclose(v, bank_before[:, 0], atol=1e-6).any() for v in column_values)


def test_memory_bank_refuses_more_negatives_than_samples():
    with pytest.raises(ValueError, match="moco.queue_size=30 negatives per step exceed the 20 training samples"):
        MemoryBankDictionary(num_samples=20, dim=4, num_negatives=30)


def _cfg(**moco):
    return build_config({"moco": moco, "model": {"arch": "small_cnn", "bn": "plain"}, "train": {"batch_size": 4}, "scaling": {"num_workers": 2}})


def test_build_dictionary_per_mechanism():
    assert isinstance(build_dictionary(_cfg(queue_size=16), 100), QueueDictionary)
    assert isinstance(build_dictionary(_cfg(mechanism="memory_bank", queue_size=16), 100), MemoryBankDictionary)
    assert isinstance(build_dictionary(_cfg(mechanism="end_to_end"), 100), EndToEndDictionary)


def test_symmetric_queue_needs_twice_the_global_batch():
    with pytest.raises(ConfigError, match="moco.queue_size=24 is not a multiple of twice the global batch 16"):
        _cfg(queue_size=24, symmetric=True)
    assert isinstance(build_dictionary(_cfg(queue_size=16, symmetric=True), 100), QueueDictionary)


def test_end_to_end_says_that_it_ignores_queue_size():
    with pytest.warns(UserWarning, match="moco.queue_size=16 is ignored by moco.mechanism=end_to_end"):
        build_dictionary(_cfg(mechanism="end_to_end", queue_size=16), 100)


def test_check_mechanism_needs_enough_samples_for_the_memory_bank():
    with pytest.raises(ValueError, match="exceed the 10 training samples"):
        check_mechanism(_cfg(mechanism="memory_bank", queue_size=16), 10)
    with pytest.raises(ValueError, match="needs the training set size"):
        check_mechanism(_cfg(mechanism="memory_bank", queue_size=16), 0)
    check_mechanism(_cfg(mechanism="memory_bank", queue_size=16), 16)
