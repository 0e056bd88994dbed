"""The MoCo module on one worker (mocolab.moco.model)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mocolab.config import build_config
from mocolab.moco.model import MoCo, MocoOutput

BATCH, SIZE = 4, 16


def _cfg(mechanism="moco", bn="split", arch="small_cnn", workers=1, **moco):
    moco = {"mechanism": mechanism, "dim": 8, "queue_size": 8 if mechanism == "memory_bank" else 16, **moco}
    return build_config(
        {
            "moco": moco,
            "model": {"arch": arch, "bn": bn, "bn_splits": 2},
            "train": {"batch_size": BATCH},
            "scaling": {"num_workers": workers},
        }
    )


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    im_q = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    im_k = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    return im_q, im_k, torch.tensor([3, 0, 5, 9])


def _model(cfg, n=20):
    torch.manual_seed(0)
    return MoCo.from_config(cfg, n).train()


@pytest.mark.parametrize("mechanism, width", [("moco", 1 + 16), ("end_to_end", BATCH), ("memory_bank", 1 + 8)])
def test_one_training_step_per_mechanism(mechanism, width):
    model = _model(_cfg(mechanism))
    out = model(*_batch())
    assert isinstance(out, MocoOutput)
    assert out.logits.shape == (BATCH, width) and out.labels.tolist() == [0] * BATCH
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, out.labels))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder_q.parameters())


@pytest.mark.parametrize("mechanism, keys_seen", [("moco", [False]), ("end_to_end", [True]), ("memory_bank", None)])
def test_key_pass_per_key_source(mechanism, keys_seen, monkeypatch):
    """Momentum encoder: keys without gradient; end-to-end: with gradient; memory bank: no key pass at all."""
    model = _model(_cfg(mechanism))
    seen = []
    forward = model.dictionary.forward

    def recording(queries, keys, index, temperature):
        seen.append(None if keys is None else [k.requires_grad for k in keys])
        return forward(queries, keys, index, temperature)

    monkeypatch.setattr(model.dictionary, "forward", recording)
    model(*_batch())
    assert seen == [keys_seen]
    assert hasattr(model, "encoder_k") == (mechanism == "moco")


def test_key_encoder_is_frozen_and_moved_only_by_momentum():
    model = _model(_cfg(momentum=0.5))
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    with torch.no_grad():  # make the encoders differ
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    model(*_batch()).loss.backward()
    for p_k, k0, q0 in zip(model.encoder_k.parameters(), k_before, q_before):
        assert torch.allclose(p_k, 0.5 * k0 + 0.5 * (q0 + 1.0), atol=1e-6)
        assert p_k.grad is None


def test_queue_receives_the_step_keys_and_the_pointer_moves():
    model = _model(_cfg())
    model(*_batch())
    assert int(model.dictionary.queue_ptr) == BATCH
    assert torch.allclose(model.dictionary.queue[:BATCH].norm(dim=1), torch.ones(BATCH), atol=1e-5)


def test_memory_bank_rows_of_the_step_change():
    model = _model(_cfg("memory_bank"))
    before = model.dictionary.bank.clone()
    model(*_batch())
    changed = (model.dictionary.bank != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [0, 3, 5, 9]


def test_symmetric_loss_is_the_sum_of_both_directions():
    torch.manual_seed(0)
    model = MoCo.from_config(_cfg(bn="plain", momentum=0.0, symmetric=True), 20).eval()  # eval: BN per sample
    im_q, im_k, index = _batch()
    out = model(im_q, im_k, index)
    assert out.logits.shape == (2 * BATCH, 1 + 16)
    with torch.no_grad():
        z_q, z_k = model.encoder_q(im_q), model.encoder_q(im_k)  # m = 0: key encoder = query encoder
    positive = (z_q * z_k).sum(1) / 0.2
    assert torch.allclose(out.logits[:BATCH, 0], positive, atol=1e-5)  # q1 . k2
    assert torch.allclose(out.logits[BATCH:, 0], positive, atol=1e-5)  # q2 . k1
    halves = [F.cross_entropy(out.logits[s], out.labels[s]) for s in (slice(0, BATCH), slice(BATCH, None))]
    assert torch.allclose(out.loss, halves[0] + halves[1])  # the MoCo CIFAR-10 demo's loss_12 + loss_21
    assert int(model.dictionary.queue_ptr) == 2 * BATCH


def test_state_dict_round_trip_keeps_queue_pointer_and_momentum_lists():
    source = _model(_cfg())
    source(*_batch())
    restored = _model(_cfg())
    restored.load_state_dict(source.state_dict(), assign=True)
    im_q, im_k, index = _batch(1)
    restored(im_q, im_k, index)
    assert int(restored.dictionary.queue_ptr) == 2 * BATCH
    assert restored._momentum_target[0] is next(restored.encoder_k.parameters())
    keys = set(source.state_dict())
    assert {"dictionary.queue", "dictionary.queue_ptr", "encoder_k.head.0.weight", "encoder_q.head.2.bias"} <= keys


def test_backbone_state_dict_loads_into_torchvision():
    model = _model(_cfg(arch="resnet18"))
    result = torchvision.models.resnet18().load_state_dict(model.backbone_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_channels_last_step():
    cfg = _cfg()
    cfg.model.channels_last = True
    out = _model(cfg)(*_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_compiled_encoders_keep_the_state_dict_keys():
    cfg = _cfg()
    plain_keys = list(_model(cfg).state_dict())
    cfg.model.compile = True  # compiles lazily: no forward here
    compiled = _model(cfg)
    assert list(compiled.state_dict()) == plain_keys
    assert compiled.backbone_state_dict().keys() == _model(_cfg()).backbone_state_dict().keys()


@pytest.mark.parametrize("mechanism, buffers", [("moco", ("queue", "queue_ptr")), ("memory_bank", ("bank",))])
def test_checkpoint_round_trip_holds_the_dictionary(mechanism, buffers, tmp_path):
    """The bank (memory_bank) survives a checkpoint save/load exactly as the queue and pointer (moco) do."""
    from mocolab.train.checkpoint import load_checkpoint, save_checkpoint

    source = _model(_cfg(mechanism))
    source(*_batch())
    save_checkpoint(tmp_path, {"model": source.state_dict()})
    restored = _model(_cfg(mechanism))
    fresh = {name: getattr(restored.dictionary, name).clone() for name in buffers}
    restored.load_state_dict(load_checkpoint(tmp_path)["model"])
    for name in buffers:
        saved = getattr(source.dictionary, name)
        assert torch.equal(getattr(restored.dictionary, name), saved)
        assert not torch.equal(fresh[name], saved)  # the step changed it: the load is what restored it
