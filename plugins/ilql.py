"""Implicit Language Q-Learning (ILQL; Snell, Kostrikov, Su, Yang & Levine 2022, arXiv:2206.11871).

Offline RL on (prompt, response, reward) triples. Heads on last hidden states h_t of a value trunk:
by default (`value_trunk: separate`) a copy of the LM's transformer that the Q/V/CQL losses train
while the LM itself stays the policy, as with the reference code's separate policy transformer;
with `value_trunk: shared` the LM's own hidden states.

    Q1, Q2 : h -> R^V        token-level action values Q(s, .) (two, for the clipped double-Q target)
    Q1', Q2': Polyak-averaged target copies (no gradient)
    V      : h -> R          state value

For a response token a_t taken in state s_t (the prefix before it), with next state s_{t+1}:

    L_Q   = sum_j E[(r_t + gamma * V(s_{t+1}) - Q_j(s_t, a_t))^2]     V(s_{t+1}) detached; the paper's L_Q
            r_t = R on the last response token (EOS), else 0;  V(terminal) = 0
    L_V   = E[L2_tau(min_j Q'_j(s_t, a_t) - V(s_t))]                  expectile regression; the paper's L_V
            L2_tau(u) = |tau - 1(u < 0)| * u^2
    L_CQL = sum_j E[logsumexp_a Q_j(s_t, a) - Q_j(s_t, a_t)]          conservative (CQL) term on Q
    L_NLL = E[-log pi(a_t | s_t)]                                     AWAC / behaviour-cloning term on the LM

    L = q_weight L_Q + v_weight L_V + cql_weight L_CQL + awac_weight L_NLL

(expectations are means over the response tokens of the optimizer step, all its micro-batches
and processes: `rlhfzoo.ops.step_denominator`). Decoding (the paper's
perturbed policy) samples from

    log pi(a|s) + beta * (min_j Q'_j(s, a) - V(s))

with the `ilql` policy (`rlhfzoo.plugins.ilql_policy`, registered here); beta = 0 is the base LM.
The targets are updated after each optimizer step, theta' <- (1 - alpha) theta' + alpha theta
(`after_step`, which the trainer calls after every optimizer step).

The objective reaches the policy only through the `Policy` interface: `setup` attaches the heads
(with the trunk, a copy of `policy.transformer()`) as `ilql_heads` (`Policy.attach`), before the
optimizer is built, so they are trained, checkpointed (`policy.save_weights`) and copied with it;
the final `policy.save(dir)` also writes `ilql_heads.safetensors` + `ilql_heads.json` beside the LM
(`save_heads`), which `{name: ilql, path: <run>/policy}` loads.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from rlhfzoo import hookimpl, kernels
from rlhfzoo.interfaces import BenchProtocol, LossOutput, Objective, PluginConfig, Policy, RewardedExample
from rlhfzoo.ops import step_denominator

HEADS_NAME = "ilql_heads"  # the heads' name among the policy's attached modules (and their weights' prefix)
HEADS_FILE = "ilql_heads.safetensors"
HEADS_META = "ilql_heads.json"


# ------------------------------------------------------------------------------------ pure pieces


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-element expectile loss |tau - 1(diff < 0)| * diff^2 (IQL/ILQL L2_tau); tau = 0.5 is half the squared error."""
    weight = torch.where(diff < 0, 1.0 - tau, tau).to(diff.dtype)
    return weight * diff.pow(2)


@torch.no_grad()
def polyak_update(target: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """target <- (1 - rate) * target + rate * online, parameter by parameter (rate = 1: copy)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach().to(t.dtype), rate)


def _mlp(hidden: int, out: int, width: int) -> torch.nn.Module:
    if width == 0:
        return torch.nn.Linear(hidden, out)
    return torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.ReLU(), torch.nn.Linear(width, out))


class ILQLHeads(torch.nn.Module):
    """Two Q heads (vocabulary-sized), their target copies and a V head, on hidden size `hidden`.

    With a `trunk` (a copy of the LM's transformer, `Policy.transformer()`) the heads read that
    trunk's hidden states, and the Q/V losses train it; without one they read the LM's own."""

    def __init__(self, hidden: int, vocab: int, width: int = 0, two_q: bool = True, trunk: torch.nn.Module | None = None):
        super().__init__()
        self.meta = {"hidden": hidden, "vocab": vocab, "width": width, "two_q": two_q, "separate_trunk": trunk is not None}
        self.trunk = trunk
        n = 2 if two_q else 1
        self.q = torch.nn.ModuleList([_mlp(hidden, vocab, width) for _ in range(n)])
        self.v = _mlp(hidden, 1, width)
        # Zero output layers: Q = V = 0 at the start, so the decoder begins as the base LM whatever beta.
        for m in (*self.q, self.v):
            last = m if isinstance(m, torch.nn.Linear) else m[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        self.target_q = copy.deepcopy(self.q)
        self.target_q.requires_grad_(False)

    def states(self, lm_hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states the heads read: the trunk's when there is one, else `lm_hidden`."""
        if self.trunk is None:
            return lm_hidden
        return run_transformer(self.trunk, input_ids, attention_mask)[0]

    def qs(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [q(h) for q in self.q]

    def target(self, h: torch.Tensor) -> torch.Tensor:
        """min_j Q'_j(h, .)  [..., V] (no gradient)."""
        with torch.no_grad():
            out = self.target_q[0](h)
            for q in self.target_q[1:]:
                out = torch.minimum(out, q(h))
        return out

    def value(self, h: torch.Tensor) -> torch.Tensor:
        return self.v(h).squeeze(-1)

    def advantage(self, h: torch.Tensor) -> torch.Tensor:
        """min_j Q'_j(h, .) - V(h): [..., V], the decoding perturbation."""
        return self.target(h) - self.value(h).unsqueeze(-1)

    @torch.no_grad()
    def update_targets(self, rate: float) -> None:
        polyak_update(self.target_q, self.q, rate)


def ilql_terms(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    heads: ILQLHeads,
    lm_weight: torch.Tensor | None = None,
    lm_bias: torch.Tensor | None = None,
    gamma: float = 0.99,
    tau: float = 0.7,
) -> dict[str, torch.Tensor]:
    """Per-token ILQL losses over the response tokens.

    hidden: [B, T, H] last hidden states of `input_ids` [B, T]; response_mask [B, T] (1 on response
    tokens and EOS); rewards [B]. Token t + 1 is the action a taken in state s = h_t. Returns flat
    [N] tensors over the N response actions (`q`, `v`, `cql`, `nll` when `lm_weight` is given) and
    `rows` [N] (the batch row of each action). Prompt and padding positions never enter.
    """
    act = response_mask[:, 1:].bool()  # [B, T-1]: action at t+1 is a response token
    B, T1 = act.shape
    # Last action of each row: terminal (V(s_{T}) = 0) and where the sequence reward is paid.
    pos = torch.arange(T1, device=act.device).expand(B, T1)
    last = torch.where(act, pos, torch.full_like(pos, -1)).max(-1).values  # [B]
    is_last = (pos == last[:, None]) & act

    rows = torch.arange(B, device=act.device)[:, None].expand(B, T1)[act]
    h_s = hidden[:, :-1][act]  # [N, H] states
    h_next = hidden[:, 1:][act]  # [N, H] next states
    a = input_ids[:, 1:][act]  # [N]
    done = is_last[act].to(hidden.dtype)
    r = (rewards.to(hidden.dtype)[:, None] * is_last.to(hidden.dtype))[act]

    v_s = heads.value(h_s)  # [N]
    with torch.no_grad():
        v_next = heads.value(h_next) * (1.0 - done)
        q_target = heads.target(h_s).gather(-1, a[:, None]).squeeze(-1)  # min_j Q'_j(s, a)
    y = r + gamma * v_next  # Bellman target, L_Q

    q_loss = torch.zeros_like(v_s)
    cql = torch.zeros_like(v_s)
    q_sa_all = []
    for q_all in heads.qs(h_s):  # [N, V]
        q_sa = q_all.gather(-1, a[:, None]).squeeze(-1)
        q_sa_all.append(q_sa)
        q_loss = q_loss + (q_sa - y).pow(2)  # L_Q (Bellman error)
        cql = cql - kernels.logprobs(q_all, a)  # L_CQL: logsumexp_a' Q - Q(a), the cross-entropy of Q as logits
    v_loss = expectile_loss(q_target - v_s, tau)  # L_V (expectile regression to the target Q)
    out = {"q": q_loss, "v": v_loss, "cql": cql, "rows": rows, "q_sa": torch.stack(q_sa_all).mean(0), "v_s": v_s}
    if lm_weight is not None:
        out["nll"] = -kernels.linear_logprobs(h_s, lm_weight, a, bias=lm_bias)  # AWAC / BC term
    return out


# ------------------------------------------------------------------------------------ data


def load_rewarded_jsonl(path: str | os.PathLike) -> list[RewardedExample]:
    """(prompt, response, reward) rows of a JSONL file as `RewardedExample`s; errors name the line."""
    from rlhfzoo.data.jsonl import DataError, check_fields, read_jsonl

    out: list[RewardedExample] = []
    source = str(path)
    for line, row in read_jsonl(path):
        where = f"{source}, line {line}"
        check_fields(row, required=("prompt", "response", "reward"), text_fields=("prompt", "response"), where=where, source=source, line=line)
        reward = row["reward"]
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise DataError(f"{where}: field 'reward' must be a number but is {reward!r}; fix the row.", source, line)
        if not math.isfinite(reward):
            raise DataError(f"{where}: field 'reward' is {reward!r}; rewards must be finite numbers.", source, line)
        out.append(RewardedExample(row["prompt"], row["response"], float(reward)))
    if not out:
        raise DataError(f"{source}: no rows; ILQL needs (prompt, response, reward) rows.", source)
    return out


def check_rewarded(data: Sequence[Any]) -> None:
    """Fail early, naming the dataset row, on examples ILQL cannot learn from."""
    for i, e in enumerate(data):
        if not isinstance(e, RewardedExample):
            raise ValueError(
                f"ilql: dataset row {i} is a {type(e).__name__}, not a RewardedExample; ILQL needs (prompt, response, reward) data "
                "(data kind 'rewarded')"
            )
        if e.reward is None or not math.isfinite(float(e.reward)):
            raise ValueError(f"ilql: dataset row {i} has reward {e.reward!r}; rewards must be finite numbers (prompt {e.prompt[:60]!r})")


# ------------------------------------------------------------------------------------ heads <-> policy


def heads_of(policy: Policy) -> ILQLHeads | None:
    """The ILQL heads attached to `policy`, or None."""
    return policy.attached(HEADS_NAME)


def save_heads(heads: ILQLHeads, path: str | os.PathLike) -> None:
    """Write `heads` (weights and the sizes that rebuild them) into the directory `path`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, os.path.join(path, HEADS_FILE))
    Path(path, HEADS_META).write_text(json.dumps(heads.meta))


def load_heads(path: str | os.PathLike, transformer: torch.nn.Module) -> ILQLHeads:
    """The heads saved in `path`; `transformer` (that of the LM they were trained on) gives the
    value trunk's architecture."""
    from safetensors.torch import load_file

    meta_file, file = Path(path, HEADS_META), Path(path, HEADS_FILE)
    if not file.exists() or not meta_file.exists():
        raise ValueError(f"ilql policy: {path} has no {HEADS_FILE} / {HEADS_META}; give the `policy/` directory of a run trained with algorithm ilql")
    meta = json.loads(meta_file.read_text())
    separate = meta.pop("separate_trunk", False)
    heads = ILQLHeads(**meta, trunk=copy.deepcopy(transformer) if separate else None)
    heads.load_state_dict(load_file(str(file)))
    return heads


def run_transformer(transformer: torch.nn.Module, input_ids, attention_mask, position_ids=None, past=None, use_cache: bool = False):
    """(last hidden states, KV cache) of a transformer (`Policy.transformer()` or a copy of it);
    positions count real tokens only, as in `Policy.hidden_states`."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = transformer(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past, use_cache=use_cache
    )
    return out.last_hidden_state, out.past_key_values


# ------------------------------------------------------------------------------------ the objective


class ILQLConfig(PluginConfig):
    gamma: float = Field(0.99, ge=0, le=1, description="Discount gamma of the token-level Bellman target r + gamma * V(s').")
    tau: float = Field(0.7, gt=0, lt=1, description="Expectile tau of the V regression towards min target Q (0.5: mean; -> 1: max).")
    q_weight: float = Field(1.0, ge=0, description="Weight of the Bellman error L_Q.")
    v_weight: float = Field(1.0, ge=0, description="Weight of the expectile value loss L_V.")
    cql_weight: float = Field(
        0.01, ge=0, description="Weight alpha of the conservative term logsumexp Q - Q(a) (CQL). On `sentiment`, 0.1 "
        "drowned the Bellman signal (Q stopped tracking the return: correlation ~0 against 0.45 at 0.01)."
    )
    awac_weight: float = Field(
        0.0, ge=0, description="Weight of the AWAC/behaviour-cloning NLL of the LM on the data (the paper: 1, with "
        "detach_trunk: false; 0 here keeps the LM the starting policy, which did better on the embedded task's budget)."
    )
    target_update_rate: float = Field(
        0.05, gt=0, le=1, description="Polyak rate alpha of the target Q heads after each optimizer step: Q' <- (1-alpha) Q' + alpha Q."
    )
    two_q: bool = Field(True, description="Two Q heads and the min of their targets (clipped double Q); false: one.")
    head_width: int = Field(
        0, ge=0, description="Hidden width of the heads' 2-layer MLP (0: a linear layer on the LM's hidden state)."
    )
    value_trunk: Literal["separate", "shared"] = Field(
        "separate", description="separate: Q and V read their own copy of the LM's transformer, trained by the Q/V/CQL "
        "losses while the LM stays the policy (the reference code's separate policy); shared: the heads read the LM's own "
        "hidden states (see detach_trunk). A frozen SFT trunk barely encodes the return (a linear probe explains <= 10% "
        "of its variance on `sentiment`), so shared heads on a detached trunk cannot learn Q."
    )
    detach_trunk: bool = Field(
        True, description="With value_trunk shared: train the heads on detached hidden states (the LM then learns only "
        "from the NLL term); false: the Q/V/CQL gradients also train the LM, as in the paper."
    )
    beta: float = Field(8.0, ge=0, description="Decoding: advantage weight beta in log pi + beta (Q - V) for the final evaluation.")
    top_k: int = Field(0, ge=0, description="Decoding: sample among the k highest-scoring tokens (0: all).")
    base_top_p: float = Field(
        1.0, gt=0, le=1, description="Decoding: sample only within the base LM's nucleus of this mass (1: off); see the `ilql` policy."
    )
    eval_prompts: int = Field(
        200, ge=0, description="Held-out prompts of the final ILQL-decoded evaluation when the trainer does not pass a count (0: none)."
    )


class ILQL(Objective):
    name = "ilql"
    summary = "Implicit Language Q-Learning: offline Q/V heads (Bellman + expectile + CQL) on rewarded data; decode log pi + beta (Q - V)."
    paper = "Snell et al. 2022, arXiv:2206.11871"
    data_kind = "rewarded"
    Config = ILQLConfig
    bench = BenchProtocol(train={"steps": 400, "batch_size": 32, "lr": 3e-3}, kl_knob="beta", kl_sweep=(1.0, 4.0, 8.0))

    def __init__(self, config: ILQLConfig | None = None):
        super().__init__(config)
        self._heads: ILQLHeads | None = None
        self.target_updates = 0

    # ---------------------------------------------------------------------------- set-up
    def attach(self, policy: Policy) -> ILQLHeads:
        """Attach new heads to `policy` (`policy.save` then writes them too), or reuse those it has."""
        heads = heads_of(policy)
        if heads is None:
            vocab, hidden = policy.output_layer().weight.shape
            trunk = copy.deepcopy(policy.transformer()) if self.config.value_trunk == "separate" else None
            if trunk is not None:
                trunk.requires_grad_(True)
            heads = ILQLHeads(hidden, vocab, self.config.head_width, self.config.two_q, trunk=trunk)
            heads = policy.attach(HEADS_NAME, heads, save=save_heads)
        self._heads = heads
        return heads

    def setup(self, policy: Policy, task: Any) -> None:
        self.attach(policy)  # before the optimizer is built, so the heads are trained

    def prepare(self, data, collate, reference) -> None:
        check_rewarded(data)

    # ---------------------------------------------------------------------------- loss
    def loss(self, batch, policy, reference=None) -> LossOutput:
        c = self.config
        heads = heads_of(policy)
        if heads is None:
            raise RuntimeError(
                "ilql: the policy has no Q/V heads; call objective.setup(policy, task) before building the optimizer "
                "(rlhfzoo's Trainer does)"
            )
        index = batch.index.tolist()
        if batch.rewards is None:
            raise ValueError(f"ilql: the batch (dataset rows {index}) has no rewards; ILQL trains on the 'rewarded' data kind")
        bad = [index[i] for i, x in enumerate(batch.rewards.tolist()) if not math.isfinite(x)]
        if bad:
            raise ValueError(f"ilql: non-finite reward in dataset rows {bad}; rewards must be finite numbers")
        seq = batch.sequences
        n_actions = seq.response_mask[:, 1:].sum(-1)
        empty = [index[i] for i, n in enumerate(n_actions.tolist()) if n == 0]
        if empty:
            raise ValueError(f"ilql: dataset rows {empty} have no response tokens after the prompt; nothing to learn from them")

        if torch.is_grad_enabled():
            policy.counters["train_tokens"] = policy.counters.get("train_tokens", 0) + int(seq.attention_mask.sum())
        # The LM learns from the NLL (awac_weight > 0) and, through shared undetached states, from Q/V/CQL.
        lm_trains = c.awac_weight > 0 or (heads.trunk is None and not c.detach_trunk)
        with torch.enable_grad() if lm_trains else torch.no_grad():
            hidden = policy.hidden_states(seq.input_ids, seq.attention_mask)
        head = policy.output_layer()
        # The value trunk's own states (trained by the Q/V/CQL losses), or the LM's.
        h_heads = heads.states(hidden, seq.input_ids, seq.attention_mask)
        if heads.trunk is None and c.detach_trunk:
            h_heads = h_heads.detach()
        terms = ilql_terms(h_heads, seq.input_ids, seq.response_mask, batch.rewards, heads, gamma=c.gamma, tau=c.tau)
        act = seq.response_mask[:, 1:].bool()
        with torch.enable_grad() if c.awac_weight > 0 else torch.no_grad():  # AWAC / BC term on the LM
            nll = -kernels.linear_logprobs(hidden[:, :-1][act], head.weight, seq.input_ids[:, 1:][act], bias=head.bias)
        n = step_denominator(batch, len(nll))  # the token mean of the whole optimizer step
        l_q, l_v, l_cql, l_nll = terms["q"].sum() / n, terms["v"].sum() / n, terms["cql"].sum() / n, nll.sum() / n
        loss = c.q_weight * l_q + c.v_weight * l_v + c.cql_weight * l_cql + c.awac_weight * l_nll
        metrics = {
            "loss_q": l_q.item(),
            "loss_v": l_v.item(),
            "loss_cql": l_cql.item(),
            "nll": l_nll.item(),
            "q_mean": terms["q_sa"].mean().item(),
            "v_mean": terms["v_s"].mean().item(),
            "reward_mean": batch.rewards.float().mean().item(),
        }
        return LossOutput(loss, metrics)

    def after_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Polyak-average the target Q heads towards the online ones, after every optimizer step."""
        if self._heads is not None:
            self._heads.update_targets(self.config.target_update_rate)
            self.target_updates += 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        # The target heads themselves are module parameters (checkpointed with the weights).
        return {"target_updates": self.target_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target_updates = int(state.get("target_updates", 0))

    # ---------------------------------------------------------------------------- evaluation
    def decoder(self, policy: Policy, beta: float | None = None, top_k: int | None = None) -> Policy:
        """The trained policy decoded with its heads: an `ilql` policy sharing its weights."""
        from rlhfzoo.plugins.ilql_policy import ILQLPolicy  # imported here: that module imports this one

        c = self.config
        return ILQLPolicy.wrap(
            policy, beta=c.beta if beta is None else beta, top_k=c.top_k if top_k is None else top_k, base_top_p=c.base_top_p
        )

    def inference_policy(self, policy: Policy) -> Policy:
        return self.decoder(policy) if heads_of(policy) is not None else policy

    def evaluate(self, policy, task, **context) -> dict[str, float] | None:
        from rlhfzoo.evaluation import evaluate

        n = context.get("n_prompts", self.config.eval_prompts)
        if not n or heads_of(policy) is None:
            return None
        figures = evaluate(self.decoder(policy), task, context.get("reward"), context.get("reference"), n, seed=context.get("seed", 0))
        figures["beta"] = float(self.config.beta)
        return figures


@hookimpl
def register_objectives(register):
    register(ILQL)


@hookimpl
def register_policies(register):
    from rlhfzoo.plugins.ilql_policy import ILQLPolicy  # imported here: that module imports this one

    register(ILQLPolicy)
