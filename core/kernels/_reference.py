"""Plain PyTorch formulas: the ``"eager"`` backend and the ground truth for tests.

They materialise the full ``[N, V]`` log-softmax (in fp32, or fp64 for fp64
inputs), which is exactly what the fused paths avoid.  ``-inf`` logits have
``p = 0`` and add 0 to the entropy and to the KL (``0 * log 0 = 0``), with a 0
gradient; a row of only ``-inf`` gives NaN (its gradient is NaN too, even
where the upstream gradient is 0, as for ``torch.log_softmax``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(acc) / temperature, dim=-1)


def logprobs(logits, targets, temperature=1.0, ignore_index=-100):
    lp = _log_softmax(logits, temperature)
    ignore = targets == ignore_index
    safe = targets.masked_fill(ignore, 0).long()
    out = lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(ignore, 0.0).clamp(max=0.0)


def _p_times(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``p * t`` with 0 where ``p == 0`` (``t`` may be infinite there), gradient included."""
    return p * torch.where(p > 0, t, 0.0)


def entropy(logits, temperature=1.0):
    lp = _log_softmax(logits, temperature)
    return -_p_times(lp.exp(), lp).sum(-1)


def vocab_kl(logits, ref_logits, temperature=1.0):
    lp = _log_softmax(logits, temperature)
    lq = _log_softmax(ref_logits, temperature)
    return _p_times(lp.exp(), lp - lq).sum(-1)


def linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False):
    logits = F.linear(hidden, weight, bias)
    lp = logprobs(logits, targets, temperature, ignore_index)
    if return_entropy:
        return lp, entropy(logits, temperature)
    return lp
