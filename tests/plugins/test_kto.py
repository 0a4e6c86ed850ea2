"""KTO: the loss against hand-computed values, the KL reference point (clamping, detaching,
averaging over processes, taken over the whole optimizer step by `begin_step`), the weight-ratio
warning, batch-size check, and the two reference modes."""

import math
import random
import subprocess
import sys
import warnings

import pytest
import torch

from rlhfzoo.data.collate import Collator
from rlhfzoo.interfaces import UnpairedExample
from rlhfzoo.plugins.kto import KTO, REFERENCE_POINT, kto_kl_estimate, kto_loss
from rlhfzoo.plugins.sentiment import SentimentTask, continue_review, make_prompts
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------ the loss itself


def test_hand_computed_values():
    r, d = t(2.0, -1.0, 0.5, 0.5), torch.tensor([True, False, True, False])
    loss = kto_loss(r, d, kl=0.5, beta=0.2, desirable_weight=1.5, undesirable_weight=0.8)
    expected = [1.5 * (1 - sig(0.2 * 1.5)), 0.8 * (1 - sig(0.2 * 1.5)), 1.5 * 0.5, 0.8 * 0.5]
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)


def test_all_desirable_and_all_undesirable_batches():
    r = t(-3.0, 0.0, 4.0)
    ones, zeros = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)
    good = kto_loss(r, ones, 1.0, beta=0.5, desirable_weight=2.0)
    bad = kto_loss(r, zeros, 1.0, beta=0.5, undesirable_weight=3.0)
    assert good.tolist() == pytest.approx([2.0 * (1 - sig(0.5 * (x - 1.0))) for x in r.tolist()], rel=1e-12)
    assert bad.tolist() == pytest.approx([3.0 * (1 - sig(0.5 * (1.0 - x))) for x in r.tolist()], rel=1e-12)
    # The other class's weight plays no part.
    assert torch.equal(good, kto_loss(r, ones, 1.0, beta=0.5, desirable_weight=2.0, undesirable_weight=99.0))
    # Raising a desirable response's log-ratio lowers its loss; an undesirable one's raises it.
    assert (good.diff() < 0).all() and (bad.diff() > 0).all()


def test_large_log_ratios_are_finite_with_the_right_asymptotes():
    r = t(1e6, -1e6, 1e6, -1e6)
    d = torch.tensor([True, True, False, False])
    loss = kto_loss(r, d, 0.0, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert loss.tolist() == pytest.approx([0.0, 1.0, 2.0, 0.0], abs=1e-12)
    r.requires_grad_(True)
    (g,) = torch.autograd.grad(kto_loss(r, d, 0.0, 0.1).sum(), r)
    assert torch.isfinite(g).all() and g.abs().max() < 1e-12  # saturated: no gradient, no NaN


def test_gradcheck_and_the_reference_point_is_detached():
    r = (torch.randn(6, dtype=torch.float64) * 4).requires_grad_()
    d = torch.tensor([True, False, True, True, False, False])
    assert torch.autograd.gradcheck(lambda x: kto_loss(x, d, 0.3, 0.5, 1.2, 0.9), (r,))
    z0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kto_loss(r, d, z0, 0.5).sum().backward()
    assert z0.grad is None  # no gradient through z0, whatever the caller passes


def test_kl_estimate_is_a_clamped_detached_mean():
    assert kto_kl_estimate(t(1.0, 3.0)).item() == pytest.approx(2.0)
    assert kto_kl_estimate(t(-1.0, -2.0)).item() == 0.0  # a KL is never negative
    assert kto_kl_estimate(t(-1.0, 0.5)).item() == 0.0
    x = t(1.0, 2.0).requires_grad_()
    assert not kto_kl_estimate(x).requires_grad


KL_WORKER = """
import sys, torch
from rlhfzoo.plugins.kto import kto_kl_estimate
rank, path = int(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
values = [torch.tensor([4.0, 2.0]), torch.tensor([-1.0, -3.0])][rank]  # per-rank means 3 and -2
print(kto_kl_estimate(values).item())
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_kl_estimate_is_averaged_across_processes(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", KL_WORKER, str(rank), str(tmp_path / "store")], stdout=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # Averaged over processes, then clamped: both ranks use 0.5 (rank 1 alone would have clamped to 0).
    assert [float(o.split()[-1]) for o in outs] == pytest.approx([0.5, 0.5])


def test_config_documents_every_field():
    assert all(f.description for f in KTO.Config.model_fields.values())
    with pytest.raises(Exception):
        KTO.Config(desirable_weight=0.0)


# ------------------------------------------------------------------------------ the objective


def toy_unpaired(n, desirable_every=2, seed=0):
    rng = random.Random(seed)
    return [UnpairedExample(p, continue_review(rng, p), i % desirable_every == 0) for i, p in enumerate(make_prompts(n, seed))]


@pytest.fixture(scope="module")
def tiny():
    policy = HFPolicy(HFPolicyConfig(**{k: v for k, v in TINY_POLICY.items() if k != "name"}), task=SentimentTask())
    return policy, Collator(policy.tokenizer, max_length=64)


def nudged(policy):
    other = HFPolicy(policy.config, task=policy.task, model=policy.frozen_copy().module, tokenizer=policy.tokenizer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    other.module.requires_grad_(True)
    return other


def test_weight_ratio_warning(tiny):
    policy, collate = tiny
    data = toy_unpaired(8, desirable_every=4)  # 2 desirable, 6 undesirable
    with pytest.warns(UserWarning, match=r"w_d\*n_d/\(w_u\*n_u\) = 0.333.*desirable_weight=3"):
        KTO(KTO.Config(reference="model")).prepare(data, collate, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KTO(KTO.Config(reference="model", desirable_weight=3.5)).prepare(data, collate, None)  # ratio 7/6: fine
        KTO(KTO.Config(reference="model")).prepare(toy_unpaired(8), collate, None)  # balanced: ratio 1
    with pytest.warns(UserWarning, match="only one class"):
        KTO(KTO.Config(reference="model")).prepare(toy_unpaired(4, desirable_every=1), collate, None)


def test_batch_of_one_is_a_clear_error(tiny):
    policy, collate = tiny
    data = toy_unpaired(4)
    for mode in ("cached", "model"):
        obj = KTO(KTO.Config(reference=mode))
        obj.prepare(data, collate, policy.frozen_copy())
        with pytest.raises(ValueError, match="at least 2 examples per micro-batch for its KL estimate"):
            obj.loss(collate([(1, data[1])]), policy, policy.frozen_copy())


def test_cached_partners_are_fixed_and_never_the_example_itself(tiny):
    policy, collate = tiny
    data = toy_unpaired(30)
    obj = KTO()
    obj.prepare(data, collate, policy.frozen_copy())
    assert not obj.reference_needed_in_training()
    assert sorted(obj._partner) == list(range(30)) and all(obj._partner[i] != i for i in range(30))
    again = KTO()
    again.prepare(data, collate, policy.frozen_copy())
    assert again._partner == obj._partner  # seeded


@pytest.mark.parametrize("mode", ["cached", "model"])
def test_loss_matches_a_hand_computation(tiny, mode):
    policy, collate = tiny
    data = toy_unpaired(16)
    reference = policy.frozen_copy()
    obj = KTO(KTO.Config(beta=0.5, desirable_weight=1.2, reference=mode))
    obj.prepare(data, collate, reference)
    rows = [5, 0, 9, 12, 3]
    batch = collate([(i, data[i]) for i in rows])

    start = obj.loss(batch, policy, reference)  # policy == reference: r = 0, z0 = 0
    weights = torch.tensor([1.2 if data[i].desirable else 1.0 for i in rows])
    assert start.loss.item() == pytest.approx(0.5 * weights.mean().item(), abs=1e-5)
    assert start.metrics["kl_estimate"] == pytest.approx(0.0, abs=1e-5)

    moved = nudged(policy)
    out = obj.loss(batch, moved, reference)
    if mode == "cached":
        kl_seq = collate([(i, UnpairedExample(data[i].prompt, data[obj._partner[i]].response, True)) for i in rows]).sequences
    else:
        kl_seq = batch.kl_sequences
    r = moved.sequence_logprobs(batch.sequences) - reference.sequence_logprobs(batch.sequences)
    z0 = (moved.sequence_logprobs(kl_seq) - reference.sequence_logprobs(kl_seq)).mean().clamp(min=0).detach()
    expected = kto_loss(r, batch.desirable, z0, 0.5, 1.2, 1.0).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.metrics["kl_estimate"] == pytest.approx(z0.item(), abs=1e-5)
    assert out.metrics["kl"] == pytest.approx(r.mean().item(), abs=1e-5)
    assert all(isinstance(v, float) for v in out.metrics.values()) and "loss" not in out.metrics
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moved.parameters())


def test_single_class_batches_report_zero_for_the_absent_class(tiny):
    policy, collate = tiny
    data = toy_unpaired(8, desirable_every=1)
    with pytest.warns(UserWarning):
        obj = KTO()
        obj.prepare(data, collate, policy.frozen_copy())
    out = obj.loss(collate(list(enumerate(data[:4]))), nudged(policy), None)
    assert out.metrics["reward_undesirable"] == 0.0 and out.metrics["reward_margin"] == 0.0
    assert out.metrics["desirable_fraction"] == 1.0 and math.isfinite(out.loss.item())


def test_begin_step_takes_z0_over_every_micro_batch_of_the_step(tiny):
    """Known log-ratios of the mismatched pairs: the policy is the reference, whose cached log-probs of
    the fixed mismatched sequences are lowered by d, so that log pi - log pi_ref = d on them (and 0 on
    the examples' own responses). Two micro-batches of unequal sizes, d = (1, 2, 3) and (4, 10): on
    its own each would use its own mean, 2 and 7; the step's z0 is the mean of all five, 20 / 5 = 4
    (not the mean of the two means, 4.5)."""
    policy, collate = tiny
    data = toy_unpaired(8)  # rows 0, 2, 4, ... desirable
    obj = KTO(KTO.Config(beta=0.5))
    obj.prepare(data, collate, policy.frozen_copy())
    d = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 10.0}
    obj.cache.values["kl"][list(d)] -= torch.tensor(list(d.values()))

    def micro_batches():
        return [collate([(i, data[i]) for i in rows]) for rows in ((0, 1, 2), (3, 4))]

    alone = [obj.loss(b, policy, None).metrics["kl_estimate"] for b in micro_batches()]
    assert alone == pytest.approx([2.0, 7.0], abs=1e-4)  # `loss` on its own: the micro-batch's estimate

    step = micro_batches()
    obj.begin_step(step, policy, None)
    assert [b.extra[REFERENCE_POINT].item() for b in step] == pytest.approx([4.0, 4.0], abs=1e-4)
    first, second = (obj.loss(b, policy, None) for b in step)
    assert first.metrics["kl_estimate"] == second.metrics["kl_estimate"] == pytest.approx(4.0, abs=1e-4)
    # r = 0 on the own responses: desirable 1 - sigma(0.5 (0 - 4)), undesirable 1 - sigma(0.5 (4 - 0)).
    good, bad = 1 - sig(-2.0), 1 - sig(2.0)
    assert first.loss.item() == pytest.approx((2 * good + bad) / 3, abs=1e-4)  # rows 0 (d), 1 (u), 2 (d)
    assert second.loss.item() == pytest.approx((bad + good) / 2, abs=1e-4)  # rows 3 (u), 4 (d)


@pytest.mark.parametrize("mode", ["cached", "model"])
def test_one_micro_batch_step_gives_the_loss_of_a_direct_call_bit_for_bit(tiny, mode):
    """With one micro-batch on one process the step's z0 is the batch's own: `begin_step` then `loss`
    (the trainer's way) gives exactly what `loss` alone gives, so grad_accum = 1 trains as before."""
    policy, collate = tiny
    data = toy_unpaired(12)
    reference = policy.frozen_copy()
    obj = KTO(KTO.Config(beta=0.5, reference=mode))
    obj.prepare(data, collate, reference)
    moved = nudged(policy)
    rows = [(i, data[i]) for i in (1, 3, 0, 5)]
    direct = obj.loss(collate(rows), moved, reference)
    step = [collate(rows)]
    obj.begin_step(step, moved, reference)
    hooked = obj.loss(step[0], moved, reference)
    assert direct.metrics["kl_estimate"] > 0  # a reference point that is not clamped
    assert torch.equal(hooked.loss, direct.loss) and hooked.metrics == direct.metrics
