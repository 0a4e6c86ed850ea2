"""What a training run does at each step that depends only on the step: the seeded data order
(`global_batch`, the same rows for a resumed run), the learning-rate schedule (`lr_factor`), the
seeds, and the memory high-water mark the summary reports."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of the examples of optimizer step `step` (0-based): a deterministic function of
    the step, so a resumed run sees exactly the batches the uninterrupted one would have."""
    rows: list[int] = []
    start = step * batch_size
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n)
        order = epoch_order(n, epoch, seed)
        rows.extend(order[offset : offset + batch_size - len(rows)])
    return rows


def lr_factor(train) -> Any:
    """Multiplier of the peak learning rate at optimizer step s: linear warm-up, then the schedule."""

    def factor(s: int) -> float:
        if s < train.warmup_steps:
            return (s + 1) / train.warmup_steps
        if train.lr_schedule == "cosine":
            progress = min(1.0, (s - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def peak_rss_mb() -> float:
    """High-water resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
