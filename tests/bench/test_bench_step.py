"""The benchmark's reference loop does the same math as mocolab's step; timing and spread helpers; spec checks."""

from __future__ import annotations

import pytest
import torch

from mocolab.bench.reference import ReferenceMoCo
from mocolab.bench.spec import StepSpec
from mocolab.bench.spread import Spread
from mocolab.bench.step import REFERENCE, build_model, compare_steps, synthetic_batch, train_step
from mocolab.bench.timing import interleaved_rates

TINY = StepSpec(
    arch="small_cnn",
    image_size=12,
    batch_size=8,
    bn="split",
    bn_splits=2,
    dim=16,
    queue_size=32,
    momentum=0.9,
    temperature=0.2,
)


@pytest.mark.parametrize(
    "spec",
    [TINY, TINY.replace(bn="shuffle", bn_splits=1), TINY.replace(bn="plain", mlp=False)],
    ids=["split-bn-mlp", "one-worker-shuffle-bn", "plain-bn-linear"],
)
def test_reference_loop_computes_mocolabs_loss_queue_and_weights_over_three_steps(spec):
    torch.set_num_threads(1)
    step_m = train_step(spec)
    # float64: the shuffled key batch sums BN's statistics in another order, whose float32 round-off three SGD
    # steps grow past 1e-6 on some CPUs; in float64 the two loops agree to round-off on any
    model, opt_m = step_m.model.double(), step_m.optimizer
    assert model.shuffle_keys == (spec.bn != "plain")
    reference = ReferenceMoCo(
        model.encoder_q, model.dictionary.queue, spec.momentum, spec.temperature, shuffle=model.shuffle_keys
    )
    opt_r = torch.optim.SGD(
        reference.encoder_q.parameters(), lr=spec.lr, momentum=spec.sgd_momentum, weight_decay=spec.weight_decay
    )
    im_q, im_k, index = synthetic_batch(spec)
    im_q, im_k = im_q.double(), im_k.double()
    for step in range(3):
        torch.manual_seed(100 + step)  # the same shuffle permutation for both
        loss_m = model(im_q, im_k, index).loss
        torch.manual_seed(100 + step)
        loss_r = reference(im_q, im_k)
        torch.testing.assert_close(loss_m, loss_r, rtol=1e-10, atol=1e-10)
        for opt, loss in ((opt_m, loss_m), (opt_r, loss_r)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(model.dictionary.queue, reference.queue.T, rtol=1e-10, atol=1e-12)
    assert model.dictionary._ptr == reference.ptr == 24
    for p_m, p_r in zip(model.encoder_k.parameters(), reference.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(p_m, p_r, rtol=1e-10, atol=1e-12)


def test_reference_loop_differs_when_the_shuffle_does_with_split_bn():
    """The check above can fail: split-BN statistics depend on the key shuffle."""
    assert TINY.bn == "split"
    model = build_model(TINY)
    reference = ReferenceMoCo(model.encoder_q, model.dictionary.queue, TINY.momentum, TINY.temperature)
    im_q, im_k, index = synthetic_batch(TINY)
    torch.manual_seed(1)
    loss_m = model(im_q, im_k, index).loss
    loss_r = reference(im_q, im_k, perm=torch.arange(TINY.batch_size))
    assert not torch.allclose(loss_m, loss_r)


def test_compare_steps_reports_every_contender_and_each_repetitions_ratio():
    torch.set_num_threads(1)
    result = compare_steps({"mocolab": TINY}, steps=2, repeats=3, warmup=1, extra={"noop": lambda: None})
    assert set(result.rates) == {"mocolab", REFERENCE, "noop"} and all(len(v) == 3 for v in result.rates.values())
    assert all(v > 0 for v in result.img_s.values())
    ratios = [m / r for m, r in zip(result.rates["mocolab"], result.rates[REFERENCE])]
    assert result.ratio("mocolab") == Spread.of(ratios)
    assert result.ratio("noop", over="mocolab").median > 1  # doing nothing is faster than a step
    assert compare_steps({"mocolab": TINY}, with_reference=False, steps=1, repeats=1, warmup=0).ratio("mocolab") is None


def test_interleaved_rates_alternate_order_and_keep_every_repetition():
    calls: list[str] = []
    rates = interleaved_rates(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        images_per_step=4,
        steps=2,
        repeats=3,
        warmup=1,
        device=torch.device("cpu"),
    )
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert set(rates) == {"a", "b"} and all(len(r) == 3 and min(r) > 0 for r in rates.values())
    with pytest.raises(ValueError, match="repeats"):
        interleaved_rates({"a": lambda: None}, 1, steps=1, repeats=0, warmup=0, device=torch.device("cpu"))


def test_a_spread_wider_than_five_percent_of_its_median_is_noisy():
    quiet = Spread.of([0.97, 1.0, 1.04])
    assert (quiet.min, quiet.median, quiet.max, quiet.repeats) == (0.97, 1.0, 1.04, 3)
    assert quiet.relative == pytest.approx(0.04) and not quiet.noisy
    assert Spread.of([0.94, 1.0, 1.01]).noisy and Spread.of([1.0, 1.0, 1.06]).noisy
    assert Spread.from_dict(quiet.as_dict()) == quiet
    with pytest.raises(ValueError, match="at least one value"):
        Spread.of([])


def test_step_spec_refuses_sizes_the_queue_cannot_hold():
    with pytest.raises(ValueError, match="moco.queue_size=100 is not a multiple of the global batch 8"):
        build_model(TINY.replace(queue_size=100))
    with pytest.raises(ValueError, match="precision"):
        TINY.replace(precision="fp8")
