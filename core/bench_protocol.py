"""What a plugin declares about itself for `rlhfzoo bench`: a `BenchProtocol`.

Objectives and inference-time policies (best-of-n) carry one as the class attribute `bench`; the
bench reads nothing else about them, so a third-party plugin joins the leaderboard on the same
terms as a built-in one:

    class MyObjective(Objective):
        bench = BenchProtocol(train={"steps": 80, "lr": 3e-4}, options={"beta": 0.3},
                              kl_knob="beta", kl_sweep=(0.03, 0.1, 0.3, 1.0))

- `contender`: run without `--algorithms` (False for stages such as SFT, for experimental rows).
- `evaluation`: `sampled` -- the trained policy's responses to held-out prompts are scored (gold,
  proxy, KL from the starting policy); `scorer` -- the output is a scorer, not a policy to sample
  from (a reward model): only its own held-out figures (`Objective.evaluate`) are reported.
- `pair_accuracy`: the keys of (accuracy, number of pairs) on the task's held-out preference pairs
  in the objective's `evaluate` figures (the implicit reward log pi/pi_ref of DPO-style objectives,
  a reward model's score). Rows are ranked by it on a task without a gold reward, where sampled
  responses cannot be scored; only objectives that report it are run there by default.
- `train`, `options`: the budget (`train:` settings: steps, batch size, lr...) and the plugin's
  own options on the embedded tasks where they differ from its Config defaults (which follow the
  paper). `configs/<name>.yaml` uses the same values, so what the learning tests measure is what
  the bench runs.
- `kl_knob`, `kl_sweep`: the option that trades reward for distance from the starting policy
  (DPO's beta, PPO's KL coefficient, best-of-n's N) and the values `--sweep kl` tries.
- `kl`: `sampled` -- KL(policy || start) estimated from the sampled responses' log-probs;
  `analytic` -- the policy's closed form (`Policy.analytic_kl`; for best-of-n log N - (N-1)/N, an
  upper bound once rewards tie).
- `search`: what `--tune` varies, dotted options with their values (`{"train.lr": (1e-4, 3e-4),
  "algorithm.beta": (0.1, 0.3)}`); by default the learning rate at 1/3, 1 and 3 times `train`'s,
  crossed with the KL knob's values (`rlhfzoo.bench_tune`).
- `base_option`, `reward_option` (inference-time policies): the options that receive the policy
  every row starts from and the reward section the row is to use (best-of-n's `base`, `reward`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class BenchProtocol:
    """How `rlhfzoo bench` runs a plugin as one row (see the module's docstring)."""

    contender: bool = True
    evaluation: Literal["sampled", "scorer"] = "sampled"
    pair_accuracy: tuple[str, str] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    kl_knob: str | None = None
    kl_sweep: tuple[Any, ...] = ()
    kl: Literal["sampled", "analytic"] = "sampled"
    base_option: str | None = None
    reward_option: str | None = None
    search: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.evaluation not in ("sampled", "scorer"):
            raise ValueError(f"BenchProtocol.evaluation must be 'sampled' or 'scorer', got {self.evaluation!r}")
        if self.kl not in ("sampled", "analytic"):
            raise ValueError(f"BenchProtocol.kl must be 'sampled' or 'analytic', got {self.kl!r}")
        if bool(self.kl_knob) != bool(self.kl_sweep):
            raise ValueError("BenchProtocol: give kl_knob and kl_sweep together (the option and the values `--sweep kl` tries)")
        for key, values in self.search.items():
            if key.split(".")[0] not in ("train", "algorithm", "policy") or "." not in key or not values:
                raise ValueError(f"BenchProtocol.search: {key!r} must be a dotted train./algorithm./policy. option with at least one value")
        if self.pair_accuracy is not None and len(self.pair_accuracy) != 2:
            raise ValueError("BenchProtocol.pair_accuracy is a pair of keys: (accuracy, number of pairs)")

    def pair_accuracy_of(self, figures: dict[str, Any]) -> tuple[float, float] | None:
        """(accuracy, pairs) from an objective's `evaluate` figures, where it reports them."""
        import math

        if self.pair_accuracy is None:
            return None
        value = figures.get(self.pair_accuracy[0])
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value), float(figures.get(self.pair_accuracy[1], 0))
