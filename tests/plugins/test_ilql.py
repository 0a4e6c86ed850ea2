"""ILQL: the expectile loss, Polyak targets, the heads' masking, decoding, bad input, save/load, learning."""

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhfzoo.config import load_config
from rlhfzoo.data.jsonl import DataError
from rlhfzoo.evaluation import evaluate
from rlhfzoo.interfaces import Batch, RewardedExample, SequenceBatch
from rlhfzoo.plugins.ilql import (
    ILQL,
    ILQLConfig,
    ILQLHeads,
    check_rewarded,
    expectile_loss,
    heads_of,
    ilql_terms,
    load_rewarded_jsonl,
    polyak_update,
)
from rlhfzoo.plugins.ilql_policy import ILQLPolicy, ILQLPolicyConfig, nucleus
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.trainer import Trainer

TINY = dict(init="scratch", n_layer=1, n_embd=32, n_head=2, max_new_tokens=8)


def random_heads(hidden=8, vocab=11, width=0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    heads = ILQLHeads(hidden, vocab, width).to(dtype)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.5)
    return heads


def toy_batch():
    # Row 0: 2 prompt tokens, 3 response tokens, 1 pad; row 1: 3 prompt tokens, 2 response tokens, 1 pad.
    ids = torch.tensor([[1, 4, 5, 6, 2, 0], [1, 7, 8, 9, 2, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    resp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]])
    return ids, attn, resp


# ------------------------------------------------------------------------------------ pure pieces


def test_expectile_loss_hand_values():
    diff = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert torch.allclose(expectile_loss(diff, 0.7), torch.tensor([0.3 * 4, 0.3 * 1, 0.0, 0.7 * 1, 0.7 * 9]))
    assert torch.allclose(expectile_loss(diff, 0.5), 0.5 * diff**2)  # half the squared error
    assert torch.allclose(expectile_loss(diff, 0.9), torch.tensor([0.4, 0.1, 0.0, 0.9, 8.1]))


def test_expectile_gradcheck():
    diff = torch.tensor([-1.3, -0.2, 0.4, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: expectile_loss(d, 0.8), (diff,))


def test_polyak_update():
    torch.manual_seed(0)
    target, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0, o0 = [p.detach().clone() for p in target.parameters()], [p.detach().clone() for p in online.parameters()]
    polyak_update(target, online, 0.25)
    for t, a, b in zip(target.parameters(), t0, o0):
        assert torch.allclose(t, 0.75 * a + 0.25 * b)
    for o, b in zip(online.parameters(), o0):
        assert torch.equal(o, b)  # the online net is untouched
    polyak_update(target, online, 1.0)
    for t, b in zip(target.parameters(), o0):
        assert torch.allclose(t, b)


def test_after_step_moves_targets_towards_online():
    obj = ILQL(ILQLConfig(target_update_rate=0.5))
    policy = HFPolicy(HFPolicyConfig(**TINY), task=SentimentTask())
    heads = obj.attach(policy)
    assert heads_of(policy) is heads and any(n.startswith("ilql_heads.") for n, _ in policy.module.named_parameters())
    trained = {n for n, p in policy.module.named_parameters() if p.requires_grad}
    assert not any(".target_q." in n for n in trained), "target heads must not be optimised"
    with torch.no_grad():
        heads.q[0].bias.fill_(2.0)
    obj.after_step({})
    assert torch.allclose(heads.target_q[0].bias, torch.full_like(heads.target_q[0].bias, 1.0))
    assert obj.state_dict() == {"target_updates": 1}


# ------------------------------------------------------------------------------------ heads and masking


@pytest.mark.parametrize("width", [0, 16])
def test_heads_shapes_and_masking(width):
    ids, attn, resp = toy_batch()
    heads = random_heads(width=width)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    rewards = torch.tensor([0.5, -1.0])
    assert heads.qs(hidden)[0].shape == (2, 6, 11) and heads.target(hidden).shape == (2, 6, 11)
    assert heads.value(hidden).shape == (2, 6)
    terms = ilql_terms(hidden, ids, resp, rewards, heads, gamma=0.9, tau=0.7)
    n = int(resp[:, 1:].sum())
    assert n == 5
    for k in ("q", "v", "cql", "rows"):
        assert terms[k].shape == (n,)
    assert terms["rows"].tolist() == [0, 0, 0, 1, 1]
    (terms["q"].sum() + terms["v"].sum() + terms["cql"].sum()).backward()
    # Gradients reach exactly the states that take a response action: hidden[:, t] with resp[:, t + 1] = 1.
    states = torch.zeros(2, 6, dtype=torch.bool)
    states[:, :-1] = resp[:, 1:].bool()
    g = hidden.grad.abs().sum(-1)
    assert (g[states] > 0).all() and (g[~states] == 0).all()
    # Padding and other prompt positions (hidden states and tokens) do not change the losses.
    h2 = hidden.detach().clone()
    h2[:, -1] += 100.0  # padding
    h2[1, 0] += 100.0  # a prompt state that takes no response action
    ids2 = ids.clone()
    ids2[:, -1] = 3
    t2 = ilql_terms(h2, ids2, resp, rewards, heads, gamma=0.9, tau=0.7)
    for k in ("q", "v", "cql"):
        assert torch.allclose(terms[k].detach(), t2[k])


def test_bellman_target_pays_reward_on_last_token():
    ids, attn, resp = toy_batch()
    heads = ILQLHeads(8, 11)  # zero output layers: Q = V = 0
    terms = ilql_terms(torch.randn(2, 6, 8), ids, resp, torch.tensor([0.5, -1.0]), heads, gamma=0.9)
    # With Q = V = 0 the Bellman error of each of the two Q heads is r^2 on the last token, 0 before.
    assert torch.allclose(terms["q"], torch.tensor([0.0, 0.0, 2 * 0.25, 0.0, 2 * 1.0]))
    assert torch.allclose(terms["cql"], torch.full((5,), 2 * math.log(11)))


def test_gradcheck_ilql_terms():
    """The Bellman/V targets are stop-gradient (semi-gradient TD), so a numerical gradient through the
    hidden states or V head would differ by design; the online Q heads enter only L_Q and L_CQL, so the
    loss is an ordinary differentiable function of their parameters (and of the V head through L_V with
    the targets held fixed)."""
    ids, attn, resp = toy_batch()
    heads = random_heads(width=4, dtype=torch.float64, seed=1)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    rewards = torch.tensor([0.5, -1.0], dtype=torch.float64)
    names = [n for n, _ in heads.q.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in heads.q.parameters())

    class WithQParams:  # the heads, with the online Q parameters taken from `ps`
        def __init__(self, ps):
            self.ps = dict(zip(names, ps))

        def qs(self, h):
            return [torch.func.functional_call(heads.q[j], {n.split(".", 1)[1]: p for n, p in self.ps.items() if n.split(".")[0] == str(j)}, (h,)) for j in range(len(heads.q))]

        def target(self, h):
            return heads.target(h)

        def value(self, h):
            return heads.value(h)

    def loss(*ps):
        t = ilql_terms(hidden, ids, resp, rewards, WithQParams(ps), gamma=0.9, tau=0.7)
        return t["q"].sum() + 0.1 * t["cql"].sum()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------ decoding


def _tiny_ilql(beta, top_k=0, value_trunk="separate"):
    task = SentimentTask()
    policy = HFPolicy(HFPolicyConfig(**TINY), task=task)
    ILQL(ILQLConfig(value_trunk=value_trunk)).attach(policy)
    with torch.no_grad():
        for p in heads_of(policy).parameters():
            p.normal_(0, 0.3)
    return ILQLPolicy.wrap(policy, beta=beta, top_k=top_k), policy


@pytest.mark.parametrize("value_trunk", ["separate", "shared"])
@pytest.mark.parametrize("beta", [0.0, 2.5])
def test_decoding_next_token_distributions(beta, value_trunk):
    """Teacher-forced incremental decoding (KV caches, left padding) against one full forward:
    beta = 0 gives the base LM's next-token distributions exactly; beta > 0 log pi + beta (Q' - V),
    with Q and V on the value trunk's states (separate) or the LM's (shared)."""
    dec, policy = _tiny_ilql(beta, value_trunk=value_trunk)
    policy.module.eval()
    prompts = ["the movie was", "a truly great film with a plot"]
    ids, attn = dec.encode_prompts(prompts, dec.config)
    forced = torch.tensor([[5, 9, 12, 7], [8, 6, 11, 10]])
    _, dists, _ = dec.decode(ids, attn, dec.config, forced=forced)
    assert dists.shape == (2, 4, policy.output_layer().weight.shape[0])
    full_ids = torch.cat([ids, forced], 1)
    full_attn = torch.cat([attn, torch.ones_like(forced)], 1)
    with torch.no_grad():
        pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
        hidden = policy.transformer()(input_ids=full_ids, attention_mask=full_attn, position_ids=pos).last_hidden_state
        P = ids.shape[1]
        h = hidden[:, P - 1 : P + 3]
        base = torch.log_softmax(policy.output_layer()(h).float(), -1)
        heads = heads_of(policy)
        hv = heads.states(hidden, full_ids, full_attn)[:, P - 1 : P + 3]
        assert (heads.trunk is None) == (value_trunk == "shared") and torch.equal(hv, h) == (value_trunk == "shared")
        expected = torch.log_softmax(base + beta * heads.advantage(hv), -1)
    assert torch.allclose(dists, expected, atol=1e-4)
    if beta == 0:
        assert torch.allclose(dists, base, atol=1e-4)


@pytest.mark.parametrize("value_trunk", ["separate", "shared"])
def test_which_weights_the_losses_train(value_trunk):
    """awac_weight 0: the LM (the policy) gets no gradient; the Q/V/CQL losses train the heads and,
    with a separate value trunk, that trunk; with a shared, detached trunk the heads alone."""
    obj = ILQL(ILQLConfig(value_trunk=value_trunk))
    policy = HFPolicy(HFPolicyConfig(**TINY), task=SentimentTask())
    heads = obj.attach(policy)
    with torch.no_grad():  # output layers start at zero, which would stop every gradient below them
        for m in (*heads.q, heads.v):
            m.weight.normal_(0, 0.3)
    out = obj.loss(_batch(torch.tensor([0.5, -0.3])), policy)
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.module.lm.parameters())
    assert all(p.grad is not None for m in (*heads.q, heads.v) for p in m.parameters())
    if value_trunk == "separate":
        assert sum(p.grad.abs().sum() for p in heads.trunk.parameters() if p.grad is not None) > 0
        lm_ids = {id(p) for p in policy.module.lm.parameters()}
        assert not any(id(p) in lm_ids for p in heads.trunk.parameters())  # a copy, not shared weights
    else:
        assert heads.trunk is None


def test_top_k_keeps_k_tokens():
    dec, _ = _tiny_ilql(1.0, top_k=3)
    ids, attn = dec.encode_prompts(["the movie was"], dec.config)
    _, dists, _ = dec.decode(ids, attn, dec.config, forced=torch.tensor([[5, 6]]))
    assert (torch.isfinite(dists).sum(-1) == 3).all()


@pytest.mark.parametrize("beta", [0.0, 2.5])
def test_rollout_logprobs_are_the_decoding_policys(beta):
    """A rollout carries the log-probs of the distribution its tokens were drawn from: the base
    LM's at beta = 0, the perturbed policy's otherwise (so its KL to a reference is its own)."""
    dec, policy = _tiny_ilql(beta)
    policy.module.eval()
    torch.manual_seed(0)
    ro = dec.generate(["the movie was", "a truly great film with a plot"])
    mask = ro.response_mask[:, 1:].float()
    base = policy.logprobs(ro.sequences, ro.attention_mask).detach() * mask
    if beta == 0:
        assert torch.allclose(ro.logprobs, base, atol=1e-4)
    else:
        ids, attn = dec.encode_prompts(ro.prompts, dec.config)
        gen = ro.sequences[:, ids.shape[1]:]
        _, dists, chosen = dec.decode(ids, attn, dec.config, forced=gen)
        teacher = dists.gather(-1, gen[:, :, None]).squeeze(-1)
        resp = ro.response_mask[:, ids.shape[1]:].float()
        assert torch.allclose(ro.logprobs[:, ids.shape[1] - 1 :] , teacher * resp, atol=1e-4)
        assert not torch.allclose(ro.logprobs, base, atol=1e-3)
    assert (ro.logprobs <= 0).all() and (ro.logprobs[mask == 0] == 0).all()


def test_nucleus_hand_computed():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    assert nucleus(probs.log(), 0.8).tolist() == [[True, False, True, False], [True, False, False, False]]
    assert nucleus(probs.log(), 0.81).tolist()[0] == [True, False, True, True]
    assert nucleus(probs.log(), 1.0).all()


def test_base_top_p_samples_only_inside_the_base_nucleus():
    """The support constraint filters on the base LM's probabilities, not on the perturbed scores:
    however large the advantage of a token outside the base nucleus, it is never sampled."""
    dec, policy = _tiny_ilql(50.0)
    dec.config = dec.config.model_copy(update={"base_top_p": 0.5})
    ids, attn = dec.encode_prompts(["the movie was"], dec.config)
    _, dists, _ = dec.decode(ids, attn, dec.config, forced=torch.tensor([[5, 6]]))
    with torch.no_grad():
        h = policy.transformer()(input_ids=ids).last_hidden_state[:, -1]
        base = torch.log_softmax(policy.output_layer()(h).float(), -1)
    allowed = nucleus(base, 0.5)[0]
    finite = torch.isfinite(dists[0, 0])
    assert finite.any() and (finite == allowed).all()
    assert allowed.sum() < allowed.numel()


def test_generate_and_evaluate_with_the_decoder():
    dec, policy = _tiny_ilql(1.0)
    ro = dec.generate(["the movie was", "an awful"])
    assert ro.sequences.shape == ro.attention_mask.shape == ro.response_mask.shape
    assert ro.logprobs.shape == (2, ro.sequences.shape[1] - 1) and len(ro.responses) == 2
    figures = evaluate(dec, dec.task, n_prompts=4, seed=0)
    assert {"gold", "gold_se", "n", "finished_rate"} <= set(figures) and figures["n"] == 4


# ------------------------------------------------------------------------------------ bad input


def _batch(rewards, resp=None):
    ids, attn, r = toy_batch()
    return Batch(SequenceBatch(ids, attn, r if resp is None else resp), index=torch.tensor([17, 42]), rewards=rewards)


def test_bad_batches_name_the_rows():
    obj = ILQL()
    policy = HFPolicy(HFPolicyConfig(**TINY), task=SentimentTask())
    obj.attach(policy)
    with pytest.raises(ValueError, match=r"rows \[17, 42\].*no rewards"):
        obj.loss(_batch(None), policy)
    with pytest.raises(ValueError, match=r"non-finite reward in dataset rows \[42\]"):
        obj.loss(_batch(torch.tensor([0.5, float("nan")])), policy)
    ids, attn, resp = toy_batch()
    resp = resp.clone()
    resp[1] = 0
    with pytest.raises(ValueError, match=r"rows \[42\] have no response tokens"):
        obj.loss(_batch(torch.tensor([0.5, 0.1]), resp), policy)
    out = obj.loss(_batch(torch.tensor([0.5, 0.1])), policy)
    assert torch.isfinite(out.loss) and all(isinstance(v, float) for v in out.metrics.values())


def test_check_rewarded_names_the_row():
    good = RewardedExample("p", "r", 0.5)
    with pytest.raises(ValueError, match="row 1 has reward inf"):
        check_rewarded([good, RewardedExample("p", "r", float("inf"))])
    with pytest.raises(ValueError, match="row 0 is a str"):
        check_rewarded(["a prompt"])


def test_load_rewarded_jsonl(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "the film", "response": "was great", "reward": 0.8}\n{"prompt": "a", "response": "b", "reward": -1}\n')
    assert load_rewarded_jsonl(f) == [RewardedExample("the film", "was great", 0.8), RewardedExample("a", "b", -1.0)]
    for bad, msg in [
        ('{"prompt": "a", "response": "b"}', "line 2: missing field 'reward'"),
        ('{"prompt": "a", "response": "b", "reward": NaN}', "line 2: field 'reward' is nan"),
        ('{"prompt": "a", "response": "b", "reward": "high"}', "line 2: field 'reward' must be a number"),
        ('{"prompt": "a", "response": "  ", "reward": 1}', "line 2"),
    ]:
        f.write_text('{"prompt": "x", "response": "y", "reward": 0}\n' + bad + "\n")
        with pytest.raises(DataError, match=msg):
            load_rewarded_jsonl(f)


# ------------------------------------------------------------------------------------ the run


def test_run_saves_heads_and_the_ilql_policy_loads_them(tmp_path):
    cfg = load_config(data={
        "task": {"name": "sentiment"},
        "policy": {"name": "hf", **TINY},
        "algorithm": {"name": "ilql", "beta": 1.0},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_prompts": 4, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })
    trainer = Trainer(cfg, log=lambda *_: None)
    assert any(p is q for p in heads_of(trainer.policy).q.parameters() for g in trainer.optimizer.param_groups for q in g["params"])
    summary = trainer.fit()
    assert summary["eval"]["n"] == 4 and summary["eval"]["beta"] == 1.0 and "gold_se" in summary["eval"]
    assert (tmp_path / "run" / "policy" / "ilql_heads.safetensors").exists()
    for path in (tmp_path / "run", tmp_path / "run" / "policy"):
        loaded = ILQLPolicy(ILQLPolicyConfig(path=str(path), beta=2.0), task=trainer.task)
        for (k, a), (k2, b) in zip(heads_of(trainer.policy).state_dict().items(), heads_of(loaded).state_dict().items()):
            assert k == k2 and torch.equal(a, b)
        assert len(loaded.generate(["the movie was"]).responses) == 1
    with pytest.raises(ValueError, match="no ilql_heads.safetensors"):
        ILQLPolicy(ILQLPolicyConfig(path=str(tmp_path)), task=trainer.task)


def test_heads_files_in_the_saved_format_load_and_are_written_back_alike(tmp_path):
    """ilql_heads.safetensors + ilql_heads.json as ILQL runs have always written them (file names,
    tensor names and metadata spelled out here, not produced by `save_heads`) load into the `ilql`
    policy, which decodes with them and saves them under the same names."""
    task = SentimentTask()
    lm = HFPolicy(HFPolicyConfig(**TINY), task=task)
    lm.save(str(tmp_path / "old"))
    vocab, hidden = lm.output_layer().weight.shape
    torch.manual_seed(0)
    tensors = {}
    for head, rows in (("q.0", vocab), ("q.1", vocab), ("target_q.0", vocab), ("target_q.1", vocab), ("v", 1)):
        tensors[f"{head}.weight"], tensors[f"{head}.bias"] = torch.randn(rows, hidden), torch.randn(rows)
    tensors.update({f"trunk.{k}": v + 0.01 * torch.randn_like(v) for k, v in lm.transformer().state_dict().items()})
    save_file(tensors, str(tmp_path / "old" / "ilql_heads.safetensors"))
    meta = {"hidden": hidden, "vocab": vocab, "width": 0, "two_q": True, "separate_trunk": True}
    (tmp_path / "old" / "ilql_heads.json").write_text(json.dumps(meta))

    policy = ILQLPolicy(ILQLPolicyConfig(path=str(tmp_path / "old"), beta=1.0), task=task)
    loaded = heads_of(policy).state_dict()
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert len(policy.generate(["the movie was"]).responses) == 1
    policy.save(str(tmp_path / "again"))
    assert load_file(str(tmp_path / "again" / "ilql_heads.safetensors")).keys() == tensors.keys()
    assert json.loads((tmp_path / "again" / "ilql_heads.json").read_text()) == meta


# ------------------------------------------------------------------------------------ learning


@pytest.mark.learning
def test_ilql_decoding_beats_sft_on_sentiment(tmp_path):
    torch.set_num_threads(2)
    start = time.time()
    cfg = load_config(data={
        "task": {"name": "sentiment"},
        "policy": {"name": "hf", "init": "sft"},
        "algorithm": {"name": "ilql"},  # the defaults: separate value trunk, CQL 0.01, beta 8
        "train": {**ILQL.bench.train, "eval_prompts": 200, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })
    trainer = Trainer(cfg, log=lambda *_: None)
    sft = evaluate(HFPolicy(HFPolicyConfig(init="sft"), task=trainer.task), trainer.task, n_prompts=200, seed=0)
    ilql = trainer.fit()["eval"]
    seconds = time.time() - start
    gap, se = ilql["gold"] - sft["gold"], math.hypot(ilql["gold_se"], sft["gold_se"])
    print(json.dumps({"sft": [sft["gold"], sft["gold_se"]], "ilql": [ilql["gold"], ilql["gold_se"]], "seconds": seconds}))
    assert gap > 3 * max(sft["gold_se"], ilql["gold_se"]), f"ILQL {ilql['gold']:.3f}±{ilql['gold_se']:.3f} vs SFT {sft['gold']:.3f}±{sft['gold_se']:.3f} (gap/se {gap / se:.1f})"



def test_the_ilql_policy_reads_no_stage_when_given_a_run(tmp_path):
    """Regression: `{name: ilql, path: RUN}` inherited `init: sft` and made the trainer/bench build the
    SFT stage it never reads."""
    from rlhfzoo.plugins.ilql_policy import ILQLPolicy, ILQLPolicyConfig

    assert ILQLPolicy.required_stages(ILQLPolicyConfig(path=str(tmp_path))) == []
    assert ILQLPolicy.required_stages(ILQLPolicyConfig()) == ["sft"]  # no run: `init` (by default the SFT stage) gives the LM
