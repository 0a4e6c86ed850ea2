"""Experiment trackers through accelerate (`train.report_to`), beside the always-written metrics.jsonl.

    train: {report_to: [tensorboard]}        # or wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab

The trainer creates its `Accelerator` with `log_with=report_to` and `project_dir=<output_dir>/trackers`
(`accelerator_options`), starts the trackers with the resolved run config once the run directory
is ready (`start`: the project is named after the output directory; nested sections are flattened
to `section/key` entries, which every tracker accepts), logs each metrics line at its step
(`accelerator.log`) and ends them with the run (`accelerator.end_training`). accelerate logs on the
main process only. A tracker whose package is not installed is a `TrackerError` (exit 2) naming the
package to install, raised before anything runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from rlhfzoo.errors import UserError

# accelerate's tracker names -> the package each needs (accelerate.tracking.LOGGER_TYPE_TO_CLASS).
TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


class TrackerError(UserError):
    """A tracker in `train.report_to` that cannot start (its package is missing)."""


def check_installed(names: list[str]) -> None:
    """Every tracker's package importable, else a `TrackerError` naming what to install."""
    missing = [name for name in names if importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        packages = " ".join(TRACKERS[n] for n in missing)
        raise TrackerError(
            f"train.report_to names {', '.join(missing)}, whose package is not installed: `pip install {packages}`, "
            "or drop it from train.report_to"
        )


def accelerator_options(report_to: list[str], output_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments of `accelerate.Accelerator` for the trackers (none without any)."""
    if not report_to:
        return {}
    check_installed(report_to)
    return {"log_with": list(report_to), "project_dir": str(Path(output_dir) / "trackers")}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 0.1}}` -> `{"train/lr": 0.1}`; lists and None as text (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start(accelerator: Any, report_to: list[str], config: dict[str, Any], output_dir: str | Path) -> None:
    """Start the trackers (if any) with the run's config, named after the output directory."""
    if report_to:
        accelerator.init_trackers(Path(output_dir).resolve().name, config=flat_config(config))
