"""Reward models: the architecture, saving in the Hugging Face format, loading, and scoring with
text in and rewards out.

A reward model is a transformer with a scalar head read at the last token that is not padding,
of `[bos] prompt response [eos]` (a conversation: its chat-template rendering):

    r(x, y) = w . h_T(x, y)        h_T: last hidden state at the last non-pad token

which is exactly what transformers' `*ForSequenceClassification` with `num_labels=1` computes
(the `score` layer, no bias, at the rightmost token that is not `config.pad_token_id`). When the
tokenizer pads with its EOS token (many hub tokenizers), that token is the one before the final
EOS, in training and in scoring alike.

Training (`bradley-terry`, `reward-regression` of `rlhfzoo.plugins.reward_model`) uses the policy's
value head (`Policy.values`, through the possibly DDP-wrapped model) with its bias held at zero
(`setup_reward_head`): transformers' `score` layer has none, and a constant offset cannot be folded
into a transformer without a LayerNorm bias (Llama, Qwen2), so the head is bias-free from the
start rather than approximately converted. At the end of the run the policy directory is written
as `AutoModelForSequenceClassification` (`save_sequence_classifier`): transformers' own class
built from the trunk's config, the trunk's weights and the head as `score`, `config.pad_token_id`
the tokenizer's, beside the tokenizer. Such a directory -- or any other `AutoModelForSequenceClassification`
with one label (TRL's `RewardTrainer` output, a downloaded reward model) -- loads with
`RewardModel.load`, which scores through the model's own forward with its own tokenizer and chat
template. Directories of earlier versions (a causal LM with `value_head.safetensors` beside it,
read at the last attention-mask token, with a bias) still load and score as they were trained.
Not a plugin (it registers nothing): the helpers of `reward_model`; held-out figures live in
`reward_eval`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfzoo.data.collate import TruncationStats, encode, pad
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Chat, Policy, Text
from rlhfzoo.policy import HFPolicy, HFPolicyConfig

VALUE_HEAD_FILE = "value_head.safetensors"  # the head of a reward model of earlier versions, beside a causal LM
EXPORT = "sequence_classifier_export"  # the name under which `setup_reward_head` attaches the exporter


class RewardModelError(UserError, ValueError):
    """A reward model cannot be loaded, cannot score its input, or returned something unusable (NaN)."""


RUN_HINT = (
    "give a directory that transformers' AutoModelForSequenceClassification loads with num_labels=1 (the `policy/` of a "
    "run of `algorithm: bradley-terry` or `reward-regression`, a TRL RewardTrainer output, a downloaded reward model), "
    "or `path: auto` for the task's cached reward model"
)


# ------------------------------------------------------------------------------ what a directory holds


def saved_config(path: Path) -> dict[str, Any]:
    """The directory's config.json as a mapping ({} when absent or not a JSON object)."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_sequence_classifier(path: Path) -> bool:
    """Whether config.json names a transformers `*ForSequenceClassification` architecture."""
    return any(str(a).endswith("ForSequenceClassification") for a in saved_config(path).get("architectures") or [])


def reward_model_problem(path: Path) -> str | None:
    """Why `path` is not a reward-model directory, from a cheap look at its files; None when it looks like one."""
    if not path.exists():
        return f"reward model directory {str(path)!r} does not exist; {RUN_HINT}"
    if not path.is_dir():
        return f"{str(path)!r} is a file, not a reward model directory; {RUN_HINT}"
    if not (path / "config.json").is_file():
        return f"{str(path)!r} holds no config.json: it is not a model directory, so not a reward model; {RUN_HINT}"
    config = saved_config(path)
    arch = ", ".join(map(str, config.get("architectures") or [])) or "a model"
    if is_sequence_classifier(path):
        # transformers writes id2label unless it is its default, two labels
        labels = config.get("id2label")
        n = len(labels) if isinstance(labels, dict) else config.get("num_labels", 2)
        if n != 1:
            return (
                f"{str(path)!r} holds a {arch} with {n} labels, a classifier: a reward model gives one score "
                f"(num_labels=1); {RUN_HINT}"
            )
        return None
    if (path / VALUE_HEAD_FILE).is_file():
        return None  # a reward model of earlier versions: a causal LM and its head
    return (
        f"{str(path)!r} holds {arch} without a reward head: it is a plain policy, not a reward model. Train one with "
        "`algorithm: {name: bradley-terry}` (configs/reward_model.yaml) and point `path` at its `policy/` directory, or "
        f"{RUN_HINT}"
    )


# ------------------------------------------------------------------------------ the forward pass


def last_token_index(attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """[B] position of the last token of each row that is real (attention mask 1) and, given
    `pad_token_id`, not that id -- transformers' `*ForSequenceClassification` rule (0 when no
    position qualifies, as there). Works for left and right padding."""
    keep = attention_mask.long()
    if pad_token_id is not None:
        keep = keep * (input_ids != pad_token_id).long()
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (keep * (positions + 1)).argmax(-1)


def sequence_rewards(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, skip_pad_id: bool = True) -> torch.Tensor:
    """r(x, y) [B] float32: the policy's scalar head (`Policy.values`) at the last token of each
    row that is not padding (`skip_pad_id`: nor the tokenizer's pad id, as transformers reads it;
    False: the last attention-mask token, the rule of reward models of earlier versions). It runs
    through the policy's (possibly DDP-wrapped) model, so that gradients are synchronised, and
    skips the log-probs."""
    try:
        values = policy.values(input_ids, attention_mask)
    except NotImplementedError as e:
        raise RewardModelError(
            f"{e}. Reward-model objectives set `needs_value_head` (the trainer then asks the policy for a head); "
            "to score, load a directory written by reward-model training"
        ) from None
    last = last_token_index(attention_mask, input_ids, policy.tokenizer.pad_token_id if skip_pad_id else None)
    return values[torch.arange(len(last), device=last.device), last].float()


# ------------------------------------------------------------------------------ saving in the HF format


def save_sequence_classifier(trunk: torch.nn.Module, head: torch.nn.Linear, pad_token_id: int | None, path: str | Path) -> None:
    """Write `trunk` (a transformers base model: LlamaModel, Qwen2Model, GPT2Model, ...) with the
    scalar `head` as transformers' `*ForSequenceClassification` (`num_labels=1`) into `path`:
    config.json (its architecture, `pad_token_id`) and the weights, the trunk's under the class's
    own prefix and the head as its `score`. The class is built on the meta device and takes the
    trunk's tensors as they are, so nothing is copied."""
    from transformers import AutoModelForSequenceClassification

    if head.bias is not None and bool(head.bias.detach().ne(0).any()):
        raise ValueError("the head has a non-zero bias, which transformers' `score` layer cannot hold")
    config = copy.deepcopy(trunk.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, pad_token_id, None
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(trunk.state_dict(), strict=True, assign=True)
    rest = [name for name, p in model.named_parameters() if p.is_meta]
    if len(rest) != 1 or model.get_parameter(rest[0]).shape != head.weight.shape:
        raise ValueError(f"{type(model).__name__} has head weights {rest}, not one [1, hidden] layer to hold the scalar head")
    dtype = next(trunk.parameters()).dtype
    model.load_state_dict({rest[0]: head.weight.detach().to(dtype)}, strict=False, assign=True)
    model.save_pretrained(str(path))


class SequenceClassifierExport(torch.nn.Module):
    """No weights of its own: attached to a reward model in training (`setup_reward_head`), it
    refers to the causal LM whose hidden states the head reads and to the head (not as children:
    no second copy in the state dict; a deep copy of the policy's module refers to the copies), so
    that its `save` writes the policy directory in the Hugging Face format."""

    # What the policy wrote that the sequence classifier replaces: its head, the causal LM's
    # generation config, a peft adapter (transformers would load it over the classifier).
    REPLACED = (VALUE_HEAD_FILE, "generation_config.json", "adapter_config.json", "adapter_model.safetensors")

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear, pad_token_id: int | None):
        super().__init__()
        self.__dict__.update(lm=lm, head=head)
        self.pad_token_id = pad_token_id

    @staticmethod
    def save(module: "SequenceClassifierExport", path: str) -> None:
        """Rewrite the policy directory as the sequence classifier; the tokenizer and
        rlhfzoo_policy.json stay. A LoRA (peft) model is written with its adapter merged in (of a
        copy: the live model keeps its adapter)."""
        lm = module.lm
        if hasattr(lm, "merge_and_unload"):
            lm = copy.deepcopy(lm).merge_and_unload()
        save_sequence_classifier(lm.base_model, module.head, module.pad_token_id, path)
        for name in module.REPLACED:
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))


def setup_reward_head(policy: Policy) -> None:
    """Make the policy's scalar head that of a transformers sequence classifier: its bias is zero
    and frozen (a head loaded with a bias loses it), and, where the model is a transformers causal
    LM (or a peft model of one), the final policy directory is written as
    `AutoModelForSequenceClassification`. A policy with another kind of head is left as it is (it
    saves its own way)."""
    from transformers import PreTrainedModel

    head = getattr(policy.module, "value_head", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        return
    if head.bias is not None:
        with torch.no_grad():
            head.bias.zero_()
        head.bias.requires_grad_(False)
    critic = getattr(policy.module, "critic", None)  # the head reads a separate critic's hidden states
    lm = critic if critic is not None else getattr(policy.module, "lm", None)
    exportable = isinstance(lm, PreTrainedModel) or hasattr(lm, "merge_and_unload")
    if exportable and policy.attached(EXPORT) is None:
        policy.attach(EXPORT, SequenceClassifierExport(lm, head, policy.tokenizer.pad_token_id), save=SequenceClassifierExport.save)


# ------------------------------------------------------------------------------ loading


def model_context(config: Any) -> int | None:
    """Positions a model can read (None: unbounded or unknown)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_sequence_classifier(path: Path) -> tuple[torch.nn.Module, Any]:
    """`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)` and its tokenizer
    (pad set to EOS where it has none; the model's `pad_token_id` to the tokenizer's where unset).
    A head transformers would initialise at random (missing weights) is an error."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for bad files
        cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}" if str(e).strip() else type(e).__name__
        raise RewardModelError(f"could not load the reward model in {str(path)!r}: {cause}. Retrain it, or {RUN_HINT}") from None
    lacking = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if lacking:
        raise RewardModelError(
            f"the reward model in {str(path)!r} lacks the weights {lacking[:4]}: transformers would initialise them at "
            f"random. Retrain it, or {RUN_HINT}"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RewardModelError(f"the tokenizer in {str(path)!r} has neither a pad nor an eos token: set one and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def rlhfzoo_max_length(path: Path) -> int | None:
    """The `max_length` a reward model was trained with (rlhfzoo_policy.json), or None."""
    try:
        saved = json.loads((path / "rlhfzoo_policy.json").read_text())
    except (OSError, ValueError):
        return None
    value = saved.get("config", {}).get("max_length") if isinstance(saved, dict) and isinstance(saved.get("config"), dict) else None
    return value if isinstance(value, int) and value > 0 else None


# ------------------------------------------------------------------------------ text in, reward out

Rewards = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> [B]


class RewardModel:
    """Scores (prompt, response) texts in batches, with the reward model's own tokenizer: `module`
    is the model (for its device and mode), `rewards(input_ids, attention_mask)` its reward of
    each right-padded row (padded with `pad_token_id`).

    Over-long inputs are truncated (prompt from the left, then the response) and counted in
    `stats`; non-text input or text the tokenizer rejects raises `RewardModelError` naming the
    row; non-finite rewards raise `RewardModelError` (never a silent zero).
    """

    def __init__(
        self, module: torch.nn.Module, tokenizer: Any, rewards: Rewards, max_length: int = 128, batch_size: int = 64,
        name: str = "reward model", pad_token_id: int | None = None,
    ):
        self.module = module
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.max_length = max_length
        self.batch_size = batch_size
        self.name = name
        self.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.stats = TruncationStats()
        self.unknown_token_responses = 0

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", max_length: int | None = None, batch_size: int = 64) -> "RewardModel":
        """A reward model from a directory: a transformers sequence classifier with one label
        (written by reward-model training, TRL, ...), scored through its own forward, or a causal
        LM with `value_head.safetensors` (earlier versions). `max_length`: longest prompt +
        response in its tokens (None: as trained, else the model's context); never past the context."""
        path = Path(path)
        problem = reward_model_problem(path)
        if problem:
            raise RewardModelError(problem)
        if is_sequence_classifier(path):
            module, tokenizer = load_sequence_classifier(path)
            pad_id = module.config.pad_token_id
            rewards: Rewards = lambda ids, attn: module(input_ids=ids, attention_mask=attn).logits[:, 0]  # noqa: E731
            context = model_context(module.config)
            trained = rlhfzoo_max_length(path) or context or 512
        else:
            try:  # a reward model never samples: max_new_tokens=1 keeps any saved max_length valid
                policy = HFPolicy(HFPolicyConfig(init=str(path), max_length=rlhfzoo_max_length(path) or 128, max_new_tokens=1))
            except ValueError as e:  # a damaged rlhfzoo_policy.json or weights (LoadError), ...
                cause = getattr(e, "cause", "") or f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                raise RewardModelError(f"could not load the reward model in {str(path)!r}: {cause}. Retrain it, or {RUN_HINT}") from None
            module, tokenizer, pad_id = policy.module, policy.tokenizer, policy.tokenizer.pad_token_id
            rewards = lambda ids, attn: sequence_rewards(policy, ids, attn, skip_pad_id=False)  # noqa: E731 -- as trained
            context = model_context(policy.transformer().config)
            trained = policy.config.max_length  # as saved (else 128), fitted to the context
        length = min(max_length or trained, context) if context else max_length or trained
        module.requires_grad_(False)
        module.eval()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        module.to(device)
        return cls(module, tokenizer, rewards, length, batch_size, name=f"reward model {str(path)!r}", pad_token_id=pad_id)

    @classmethod
    def from_policy(cls, policy: Policy, **kwargs: Any) -> "RewardModel":
        """Score with a policy being trained (evaluation inside a run), as its saved directory scores."""
        kwargs.setdefault("max_length", getattr(policy.config, "max_length", 128))
        return cls(policy.module, policy.tokenizer, lambda ids, attn: sequence_rewards(policy, ids, attn), **kwargs)

    # -------------------------------------------------------------------------- encoding
    def encode(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[list[int]]:
        """Token ids of each (prompt, response), as the collator encodes them (a conversation with its chat template)."""
        if len(prompts) != len(responses):
            raise RewardModelError(f"{self.name} got {len(prompts)} prompts but {len(responses)} responses")
        unk = self.tokenizer.unk_token_id
        stats = TruncationStats()  # committed to self.stats only when every row encodes
        rows, unknown = [], 0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for what, text in (("prompt", p), ("response", r)):
                if not isinstance(text, (str, Chat)):
                    raise RewardModelError(f"{self.name}: {what} {i} is a {type(text).__name__}, not text: {text!r:.80}")
            try:
                ids, response_mask = encode(self.tokenizer, p, r, self.max_length, stats)
            except UserError as e:  # a conversation and a tokenizer without a chat template, ...
                raise RewardModelError(f"{self.name} cannot encode example {i}: {e}") from None
            except Exception as e:  # noqa: BLE001 -- tokenizers raise TypeError/ValueError/pyo3 errors
                raise RewardModelError(
                    f"{self.name} cannot tokenise example {i} (response {r!r:.80}): {type(e).__name__}: {e}. "
                    "Pass valid Unicode text (e.g. no lone surrogates)."
                ) from None
            unknown += unk is not None and any(t == unk for t, m in zip(ids, response_mask) if m)
            rows.append(ids)
        self.stats.sequences += stats.sequences
        self.stats.truncated += stats.truncated
        self.unknown_token_responses += unknown
        return rows

    # -------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> torch.Tensor:
        """Rewards [B] float32 on the CPU."""
        rows = self.encode(prompts, responses)
        out = torch.empty(len(rows), dtype=torch.float32)
        if not rows:
            return out
        device = next(self.module.parameters()).device
        was_training = self.module.training
        self.module.eval()
        try:
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: less padding
            for k in range(0, len(order), self.batch_size):
                idx = order[k : k + self.batch_size]
                ids = pad([rows[i] for i in idx], self.pad_token_id)
                attn = pad([[1] * len(rows[i]) for i in idx], 0)
                out[idx] = self.rewards(ids.to(device), attn.to(device)).float().cpu()
        finally:
            self.module.train(was_training)
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
        if bad:
            raise RewardModelError(
                f"{self.name} returned non-finite rewards ({out[bad[0]].item()}) for {len(bad)} of {len(out)} inputs, "
                f"e.g. example {bad[0]} (response {responses[bad[0]]!r:.80}). Its weights may hold NaN/inf "
                "(a diverged run): retrain it or load an earlier checkpoint"
            )
        return out
