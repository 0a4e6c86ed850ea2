"""Shared plumbing of the offline preference objectives (`dpo`, `ipo`, `kto`).

Not a plugin (it registers nothing). It holds what the three losses have in common:

* `PreferenceConfig`: the options all three take (summed or averaged log-probs, where the
  reference log-probs come from), the base of their `Config`s;
* `ReferenceCache`: reference log-probs computed once per example before training (batched,
  under `torch.no_grad`, keyed by dataset row), so the trainer can free the reference model;
* `reference_logprobs`: the per-step alternative, through the frozen reference model;
* `PairedObjective`: the DPO/IPO skeleton -- chosen/rejected log-ratios of a batch of pairs,
  with degenerate pairs (chosen == rejected) masked out -- leaving the loss formula to the
  subclass;
* the per-step metrics (plain floats): implicit rewards, reward accuracy and margin, KL;
* `ImplicitRewardEvaluation` (a base of `PairedObjective`): the end-of-run evaluation -- the
  default sampling evaluation plus the implicit reward's accuracy on the task's held-out pairs
  (`implicit_reward_figures`), the preference objectives' counterpart of a reward model's
  pairwise accuracy.

LoRA adapters as the reference (peft's "disable the adapter to get pi_ref") are not
implemented: the reference is always a frozen copy of the initial policy, or its cached
log-probs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field

from rlhfzoo.data.collate import Collator
from rlhfzoo.evaluation import evaluate as sampling_evaluation
from rlhfzoo.interfaces import Batch, Chat, LossOutput, Objective, PluginConfig, Policy, SequenceBatch, Task
from rlhfzoo.ops import masked_mean

logger = logging.getLogger(__name__)


class PreferenceConfig(PluginConfig):
    """Options shared by the preference objectives: how a response's log-probs are pooled and where
    the reference's come from. DPO, IPO and KTO add their own coefficients (IPO also changes the
    default of `average_logprobs`)."""

    average_logprobs: bool = Field(False, description="Length-average the response log-probs instead of summing them (the paper sums).")
    reference: Literal["cached", "model"] = Field(
        "cached",
        description="`cached`: reference log-probs computed once per example before training, then the reference model is freed; "
        "`model`: keep the frozen reference model and run it every step.",
    )
    reference_batch_size: int = Field(64, ge=1, description="Examples per forward pass when caching reference log-probs.")

# ------------------------------------------------------------------------------ small helpers


def response_tokens(seq: SequenceBatch) -> torch.Tensor:
    """Number of response tokens whose log-prob is taken, per example [B] (what
    `Policy.sequence_logprobs` sums over; >= 1 whenever the sequence starts with a prompt/BOS token)."""
    return seq.response_mask[:, 1:].sum(-1)


def concat(*batches: SequenceBatch) -> SequenceBatch:
    """Stack right-padded batches into one (padding the narrower ones), for a single forward pass."""
    width = max(b.input_ids.shape[1] for b in batches)

    def stacked(field: str) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0) for t in (getattr(b, field) for b in batches)])

    return SequenceBatch(stacked("input_ids"), stacked("attention_mask"), stacked("response_mask"))


def identical(a: SequenceBatch, b: SequenceBatch) -> torch.Tensor:
    """[B] bool: example i of `a` and of `b` are the same token sequence (padding ignored)."""
    width = min(a.input_ids.shape[1], b.input_ids.shape[1])
    len_a, len_b = a.attention_mask.sum(-1), b.attention_mask.sum(-1)
    same = (a.input_ids[:, :width] == b.input_ids[:, :width]) | (a.attention_mask[:, :width] == 0)
    return same.all(-1) & (len_a == len_b) & (len_a <= width)


def reference_logprobs(reference: Policy | None, seq: SequenceBatch, average: bool) -> torch.Tensor:
    """log pi_ref(y|x) [B] from the frozen reference model (moved to the batch's device if needed)."""
    if reference is None:
        raise RuntimeError(
            "this objective computes reference log-probs per step (`reference: model`) but got no reference "
            "policy; it needs `needs_reference = True` and a trainer that keeps the reference model"
        )
    module = reference.module
    param = next(module.parameters(), None)
    if param is not None and param.device != seq.input_ids.device:
        module.to(seq.input_ids.device)  # the trainer builds the reference on the CPU
    with torch.no_grad():
        return reference.sequence_logprobs(seq, average=average).float()


def warn_identical_pairs(name: str, data) -> None:
    """Log once how many pairs have the same chosen and rejected response (masked out of the loss)."""
    same = sum(e.chosen == e.rejected for e in data)
    if same:
        logger.warning(
            "%s: %d of %d preference pairs have identical chosen and rejected responses; they express no "
            "preference and are masked out of the preference loss (counted as `skipped_pairs`)", name, same, len(data),
        )


def valid_pairs(batch) -> torch.Tensor:
    """[B] bool: pairs with two different sides, each with at least one response token."""
    chosen, rejected = batch.sequences, batch.rejected
    return ~identical(chosen, rejected) & (response_tokens(chosen) > 0) & (response_tokens(rejected) > 0)


# ------------------------------------------------------------------------------ reference cache


class ReferenceCache:
    """Reference log-probs per dataset row, under one or more names ("chosen", "rejected", ...).

    `build` runs the reference over a list of examples in batches of `batch_size` (or the given
    `chunks` of rows) under `torch.no_grad` and stores `log pi_ref` of the sequences `view(batch)`
    picks out of each collated batch, at the rows the batch's `index` names. `lookup` returns them for a batch
    (on the batch's device); rows never filled are reported, not invented.
    """

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values

    @torch.no_grad()
    def build(
        self,
        views: dict[str, Callable[[Batch], SequenceBatch]],
        examples: Sequence[Any],
        collate: Callable[[list], Batch],
        reference: Policy,
        average: bool,
        batch_size: int = 64,
        chunks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        n = len(examples)
        store = {name: torch.full((n,), float("nan"), dtype=torch.float32) for name in views}
        module = reference.module
        if torch.cuda.is_available() and next(module.parameters()).device.type == "cpu":
            module.to(torch.device("cuda", torch.cuda.current_device()))
        device = next(module.parameters()).device
        was_training = module.training
        module.eval()
        try:
            if chunks is None:  # similar lengths together: less padding per forward pass
                order = sorted(range(n), key=lambda i: _text_length(examples[i]))
                chunks = [order[k : k + batch_size] for k in range(0, n, batch_size)]
            for rows in chunks:
                batch = collate([(i, examples[i]) for i in rows]).to(device)
                index = batch.index.cpu()
                # Every view of the batch in one forward pass.
                logprobs = reference.sequence_logprobs(concat(*(view(batch) for view in views.values())), average=average)
                for name, lp in zip(views, logprobs.float().cpu().split(len(rows))):
                    store[name][index] = lp
        finally:
            module.train(was_training)
        self.values.update(store)

    def lookup(self, name: str, index: torch.Tensor) -> torch.Tensor:
        values = self.values[name]
        rows = index.cpu()
        if rows.numel() and (rows.max() >= len(values) or rows.min() < 0):
            raise KeyError(f"reference cache {name!r} holds {len(values)} rows, the batch asks for row {rows.max().item()}")
        return values[rows].to(index.device)


def _text_length(example: Any) -> int:
    texts = [v for v in vars(example).values() if isinstance(v, (str, Chat))] if hasattr(example, "__dict__") else []
    return sum(len(str(v)) for v in texts)


# ------------------------------------------------------------------------------ held-out evaluation

# Held-out pairs scored at the end of a run: the reward models' default `eval_examples`, so that in a
# benchmark the implicit-reward and reward-model accuracies are measured on the same pairs.
EVAL_PAIRS = 2000


@torch.no_grad()
def implicit_reward_figures(
    policy: Policy, reference: Policy, pairs: Sequence[Any], average: bool = False, max_length: int = 128, batch_size: int = 32
) -> dict[str, float]:
    """How well the implicit reward log pi/pi_ref orders held-out preference pairs (x, y_w, y_l):

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        implicit_reward_accuracy = mean over pairs of 1[h > 0] + 1/2 1[h = 0]     (ties count half)
        implicit_reward_margin   = mean over pairs of h                          (nats, not times beta)

    Log-probs are summed over the response tokens (or averaged, `average`), as the objective
    trains them; the sign of h, hence the accuracy, does not depend on DPO's beta.
    """
    collate = Collator(policy.tokenizer, max_length=max_length)
    module = policy.module
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    order = sorted(pairs, key=_text_length)  # similar lengths together (both figures ignore the order)
    diffs = []
    try:
        for k in range(0, len(order), batch_size):
            batch = collate(list(enumerate(order[k : k + batch_size]))).to(device)
            both = concat(batch.sequences, batch.rejected)
            ratio = policy.sequence_logprobs(both, average=average).float() - reference_logprobs(reference, both, average)
            diffs.append((ratio[: len(batch)] - ratio[len(batch) :]).cpu())
    finally:
        module.train(was_training)
    h = torch.cat(diffs).double()
    return {
        "implicit_reward_accuracy": ((h > 0).double() + 0.5 * (h == 0).double()).mean().item(),
        "implicit_reward_margin": h.mean().item(),
        "implicit_reward_pairs": float(len(h)),
    }


class ImplicitRewardEvaluation:
    """`Objective.evaluate` for objectives whose implicit reward is (a multiple of) log pi/pi_ref --
    DPO and IPO through `PairedObjective`; KTO's is the same and can list this class as a base:
    the default sampling evaluation plus `implicit_reward_figures` on the task's held-out pairs
    (at most `EVAL_PAIRS`), skipped when there is no reference or the task has no pairs."""

    def evaluate(self, policy: Policy, task: Task, **context: Any) -> dict[str, float]:
        reference = context.get("reference")
        figures = sampling_evaluation(
            policy, task, context.get("reward"), reference, context.get("n_prompts", 64), seed=context.get("seed", 0)
        )
        try:
            pairs = task.examples("pairs", split="test")[:EVAL_PAIRS]
        except (ValueError, KeyError, NotImplementedError):  # the task has no preference pairs
            pairs = []
        if reference is not None and pairs:
            average = self.config.average_logprobs  # a PreferenceConfig
            max_length = getattr(policy.config, "max_length", 128)  # as the trainer's collator
            figures.update(implicit_reward_figures(policy, reference, pairs, average, max_length))
        return figures


# ------------------------------------------------------------------------------ pairwise objectives


class PairedObjective(ImplicitRewardEvaluation, Objective):
    """Skeleton of a pairwise offline objective (DPO, IPO): reference handling, masking and metrics.

    The subclass sets `Config` (a `PreferenceConfig`), `reward_scale` (the coefficient of the implicit reward `scale * log-ratio` in the metrics),
    and writes `loss` with `pair_logratios` and `pair_metrics`.
    """

    data_kind = "pairs"
    needs_reference = True

    def __init__(self, config=None):
        super().__init__(config)
        self.cache = ReferenceCache()

    @property
    def reward_scale(self) -> float:
        raise NotImplementedError

    def prepare(self, data, collate, reference) -> None:
        warn_identical_pairs(self.name, data)  # printed once per run even where no logging is set up
        if self.config.reference != "cached":
            return
        if reference is None:
            raise RuntimeError(f"{self.name}: `reference: cached` needs the reference policy in `prepare`")
        views = {"chosen": lambda b: b.sequences, "rejected": lambda b: b.rejected}
        self.cache.build(views, data, collate, reference, self.config.average_logprobs, self.config.reference_batch_size)

    def reference_needed_in_training(self) -> bool:
        return self.config.reference == "model"  # `cached`: `prepare` stored its log-probs

    def pair_logratios(self, batch: Batch, policy: Policy, reference: Policy | None):
        """(chosen log-ratios [B], rejected log-ratios [B], valid [B] bool).

        log-ratio = log pi(y|x) - log pi_ref(y|x), summed or averaged over response tokens
        (`average_logprobs`). `valid` drops pairs whose two sides are the same token sequence,
        and any side without a response token (impossible with the library's collator, which
        always ends a response with EOS -- an empty completion is scored as "stop at once").
        """
        avg = self.config.average_logprobs
        chosen, rejected = batch.sequences, batch.rejected
        n = len(chosen)
        policy_lp = policy.sequence_logprobs(concat(chosen, rejected), average=avg).float()
        pi_c, pi_r = policy_lp[:n], policy_lp[n:]
        if self.config.reference == "cached" and "chosen" in self.cache:
            ref_c, ref_r = self.cache.lookup("chosen", batch.index), self.cache.lookup("rejected", batch.index)
        else:
            ref = reference_logprobs(reference, concat(chosen, rejected), avg)
            ref_c, ref_r = ref[:n], ref[n:]
        return pi_c - ref_c, pi_r - ref_r, valid_pairs(batch)

    def pair_metrics(self, chosen: torch.Tensor, rejected: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
        """Implicit rewards (scale * log-ratio), reward accuracy and margin, KL on the batch."""
        chosen, rejected = chosen.detach(), rejected.detach()
        s = self.reward_scale
        return {
            "reward_chosen": masked_mean(s * chosen, valid).item(),
            "reward_rejected": masked_mean(s * rejected, valid).item(),
            "accuracy": masked_mean((chosen > rejected).float(), valid).item(),
            "reward_margin": masked_mean(s * (chosen - rejected), valid).item(),
            "kl": masked_mean(chosen, valid).item(),  # E_{y_w}[log pi/pi_ref] on the batch
            "skipped_pairs": float((~valid).sum().item()),
        }

    def pair_loss(self, losses: torch.Tensor, chosen, rejected, valid) -> LossOutput:
        return LossOutput(masked_mean(losses, valid), self.pair_metrics(chosen, rejected, valid))
