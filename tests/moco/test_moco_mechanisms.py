"""The contrastive mechanisms of moco.mechanism, on one worker (mocolab.moco.mechanisms)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mocolab.config import ConfigError, build_config
from mocolab.moco.functional import infonce_logits, sample_excluding
from mocolab.moco.mechanisms import MECHANISMS, build_dictionary, mechanism_class
from mocolab.moco.mechanisms.base import DictionarySettings, KeySource, Mechanism
from mocolab.moco.mechanisms.end_to_end import EndToEndDictionary
from mocolab.moco.mechanisms.memory_bank import MemoryBankDictionary
from mocolab.moco.mechanisms.queue import QueueDictionary

T = 0.2


def _unit(*shape, grad=False):
    return F.normalize(torch.randn(*shape), dim=-1).requires_grad_(grad)


def test_every_registered_mechanism_declares_its_name_key_source_and_k():
    settings = DictionarySettings(queue_size=64, dim=8, global_batch=16, num_train_samples=200)
    for name in MECHANISMS:
        cls = mechanism_class(name)
        assert issubclass(cls, Mechanism) and cls.name == name and isinstance(cls.key_source, KeySource)
        symmetric_only = name == "moco_v3"  # v3: both crops are queries
        assert isinstance(build_dictionary(name, replace(settings, symmetric=symmetric_only)), cls)
    assert [mechanism_class(n).effective_k(settings) for n in ("moco", "end_to_end", "memory_bank")] == [64, 16, 64]
    with pytest.raises(ValueError, match="moco.mechanism='bank' is not one of moco, end_to_end, memory_bank, moco_v3"):
        mechanism_class("bank")


def test_queue_logits_use_the_queue_before_the_step_and_enqueue_the_keys():
    torch.manual_seed(0)
    dictionary = QueueDictionary(size=8, dim=4)
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
    dictionary = QueueDictionary(size=6, dim=4)
    q, k = _unit(3, 4, grad=True), _unit(3, 4)
    queue_before = dictionary.queue.clone()
    F.cross_entropy(*dictionary([q], [k], None, T)).backward()  # the in-place enqueue must not break backward
    q_ref = q.detach().clone().requires_grad_(True)
    F.cross_entropy(*infonce_logits(q_ref, k, queue_before, T)).backward()
    assert torch.allclose(q.grad, q_ref.grad, atol=1e-6)


def test_queue_two_directions_enqueue_both_key_sets():
    dictionary = QueueDictionary(size=8, dim=4)
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
    with pytest.raises(ValueError, match="moco.queue_size=10 is not a multiple of the global batch 4"):
        QueueDictionary.check(DictionarySettings(queue_size=10, dim=4, global_batch=4))
    with pytest.raises(ValueError, match="moco.queue_size=24 is not a multiple of twice the global batch 32"):
        QueueDictionary.check(DictionarySettings(queue_size=24, dim=4, global_batch=16, symmetric=True))


def test_end_to_end_logits_are_the_batch_with_gradient_to_the_keys():
    q, k = _unit(4, 8, grad=True), _unit(4, 8, grad=True)
    logits, labels = EndToEndDictionary()([q], [k], None, T)
    assert logits.shape == (4, 4) and not labels.any()  # K = batch: 1 positive + 3 negatives
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / T, atol=1e-6)
    F.cross_entropy(logits, labels).backward()
    assert k.grad is not None and k.grad.abs().sum() > 0


# --- the memory bank (InstDisc) ------------------------------------------------------------------------


def _bank(n=20, dim=4, negatives=6, seed=2):
    torch.manual_seed(seed)
    return MemoryBankDictionary(num_samples=n, dim=dim, num_negatives=negatives, momentum=0.5)


def test_memory_bank_positive_is_the_stored_row_before_the_update():
    bank = _bank()
    before = bank.bank.clone()
    q, index = _unit(3, 4, grad=True), torch.tensor([7, 0, 13])
    logits, labels = bank([q], None, index, T)
    assert logits.shape == (3, 7) and not labels.any()
    assert torch.allclose(logits[:, 0], (q * before[index]).sum(1) / T, atol=1e-6)


def test_memory_bank_updates_exactly_the_step_rows_from_the_queries_with_momentum_half():
    bank = _bank()
    before = bank.bank.clone()
    q, index = _unit(3, 4, grad=True), torch.tensor([7, 0, 13])
    bank([q], None, index, T)
    changed = (bank.bank != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 7, 13]
    expected = F.normalize(0.5 * before[index] + 0.5 * q.detach(), dim=1)
    assert torch.allclose(bank.bank[index], expected, atol=1e-6)
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(20), atol=1e-5)


def test_memory_bank_negatives_are_stored_rows_never_a_row_of_the_batch():
    n = 12
    bank = _bank(n=n, dim=n, negatives=400, seed=3)
    with torch.no_grad():
        bank.bank.copy_(torch.eye(n))  # row i is the one-hot e_i: a negative's logit names its row
    index = torch.tensor([2, 5, 9])
    reader = torch.arange(1.0, n + 1)[None].expand(3, n)  # reader . e_i = i + 1: each logit names its row
    logits, _ = bank([reader], None, index, 1.0)
    rows = (logits[:, 1:].round().long() - 1).unique().tolist()
    assert not set(rows) & {2, 5, 9}
    assert set(rows) == set(range(n)) - {2, 5, 9}  # uniform draws over every other row (400 draws)
    assert torch.equal(logits[0, 1:], logits[1, 1:])  # negatives shared by the mini-batch


def test_memory_bank_gradient_reaches_only_the_queries():
    bank = _bank()
    q = _unit(3, 4, grad=True)
    loss = F.cross_entropy(*bank([q], None, torch.tensor([1, 2, 3]), T))
    loss.backward()
    assert q.grad is not None and not bank.bank.requires_grad


def test_memory_bank_refuses_symmetric_and_too_few_images():
    with pytest.raises(ValueError, match="moco.symmetric=true needs a key crop"):
        MemoryBankDictionary.check(DictionarySettings(16, 4, 4, symmetric=True))
    with pytest.raises(
        ValueError, match="global batch of 16; the memory bank has 40 images, so use moco.queue_size <= 24"
    ):
        MemoryBankDictionary.check(DictionarySettings(queue_size=32, dim=4, global_batch=16, num_train_samples=40))
    MemoryBankDictionary.check(DictionarySettings(queue_size=24, dim=4, global_batch=16, num_train_samples=40))
    MemoryBankDictionary.check(DictionarySettings(queue_size=10**6, dim=4, global_batch=16))  # size not known yet


def test_memory_bank_round_trips_through_a_checkpoint(tmp_path):
    from mocolab.train.checkpoint import load_checkpoint, save_checkpoint

    bank = _bank()
    bank([_unit(3, 4)], None, torch.tensor([7, 0, 13]), T)  # rows 7, 0, 13 now differ from their initial values
    save_checkpoint(tmp_path, {"model": bank.state_dict()})
    restored = _bank(seed=99)
    assert not torch.equal(restored.bank, bank.bank)
    restored.load_state_dict(load_checkpoint(tmp_path)["model"])
    assert torch.equal(restored.bank, bank.bank)


def test_sample_excluding_is_uniform_over_the_allowed_indices():
    torch.manual_seed(0)
    draws = sample_excluding(10, torch.tensor([3, 0, 3, 9]), 20000)
    counts = torch.bincount(draws, minlength=10)
    assert counts[[0, 3, 9]].sum() == 0
    allowed = counts[[1, 2, 4, 5, 6, 7, 8]].float()
    assert (allowed / allowed.mean() - 1).abs().max() < 0.08  # 7 values, ~2857 draws each
    with pytest.raises(ValueError, match="all 2 indices are excluded"):
        sample_excluding(2, torch.tensor([0, 1]), 1)


# --- the rules at config load ----------------------------------------------------------------------------


def _cfg(**moco):
    return build_config(
        {
            "moco": moco,
            "model": {"arch": "small_cnn", "bn": "plain"},
            "train": {"batch_size": 4},
            "scaling": {"num_workers": 2},
        }
    )


def test_config_load_runs_each_mechanisms_own_rules():
    with pytest.raises(ConfigError, match="moco.queue_size=24 is not a multiple of twice the global batch"):
        _cfg(queue_size=24, symmetric=True)
    with pytest.raises(ConfigError, match="moco.symmetric=true needs a key crop"):
        _cfg(mechanism="memory_bank", queue_size=16, symmetric=True)
    with pytest.raises(ConfigError, match="moco.mechanism='bank' is not one of"):
        _cfg(mechanism="bank")
    _cfg(mechanism="end_to_end", queue_size=13)  # end_to_end has no queue: its size is not checked
