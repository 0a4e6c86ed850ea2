"""Checkpoints in formats that cannot run code: tensors in safetensors, everything else in JSON.

    save_state(state, ckpt / "optimizer")     # writes optimizer.json (+ optimizer.safetensors)
    state = load_state(ckpt / "optimizer")    # the same structure back, bit for bit

`state` is any nesting of dicts, lists and tuples over None, bool, int, float, str, torch tensors
and numpy arrays or scalars: an optimizer's, a scheduler's or an objective's `state_dict()`, the
RNG states. Pickle (what `torch.load` reads) can run code hidden in a file, and anyone can write
a checkpoint and its manifest, so pickle is never read: a checkpoint holding anything but the
files of this format is refused (`check_format`).

The JSON skeleton tags every container, so what plain JSON would lose comes back:

    {"dict": [[key, value], ...]}      keys keep their type (an optimizer's `state` has int keys)
    {"list": [...]}, {"tuple": [...]}  tuples stay tuples (`random.setstate` needs them)
    {"tensor": "t3"}                   the tensor named t3 in the .safetensors file
    {"ndarray": "t4", "dtype": "<u4", "shape": [624], "scalar": false}
                                       a numpy array (or scalar), kept as its raw bytes

Plain JSON values (null, true, 3, 0.5, "MT19937") stand for themselves.

A checkpoint directory `checkpoints/step-N/` holds:

    state.json                       {"format": 2, "step": N, "world": processes}
    model.safetensors                the policy's weights
    optimizer.*, scheduler.*, objective.*   their state_dicts (main process)
    process-R.*                      RNG states and budget counters of process R
    MANIFEST.json                    sizes and hashes (rlhfzoo.artifacts), written last
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from rlhfzoo import artifacts
from rlhfzoo.training_errors import TrainingError

FORMAT = 2  # 1 (no "format" in state.json): pickled optimizer/scheduler/objective/RNG state
MAIN_STEMS = ("optimizer", "scheduler", "objective")
STEP_DIR = re.compile(r"step-(\d+)")
PARTIAL_DIR = re.compile(r"\.tmp-step-\d+")
NUMPY_KINDS = "biufc"  # bool, int, unsigned, float, complex: plain bytes, nothing to execute


class CheckpointFormatError(TrainingError):
    """A checkpoint is not in this version's safe format, or its files do not decode."""


# ------------------------------------------------------------------------------ state <-> files


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        value = np.asarray(value)
        scalar = True
    else:
        scalar = False
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in NUMPY_KINDS:
            raise TypeError(f"{where}: a numpy array of dtype {value.dtype} cannot be stored in a checkpoint")
        key = f"t{len(tensors)}"
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy()
        tensors[key] = torch.from_numpy(raw)
        return {"ndarray": key, "dtype": value.dtype.str, "shape": list(value.shape), "scalar": scalar}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be stored in a checkpoint; state_dict() may hold dicts, lists, "
        "tuples, numbers, strings, None, torch tensors and numpy arrays"
    )


def save_state(state: Any, stem: str | Path, where: str = "state") -> None:
    """Write `state` as `<stem>.json`, plus `<stem>.safetensors` when it holds tensors or arrays.
    `where` names the state in the message of a value that cannot be stored."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, where)
    if tensors:
        save_file(tensors, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps({"format": FORMAT, "state": skeleton}))


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) not in (1, 4):
        raise ValueError(f"unexpected JSON node {str(node)[:80]}")
    if "dict" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        dtype = np.dtype(node["dtype"])
        if dtype.kind not in NUMPY_KINDS:
            raise ValueError(f"numpy dtype {dtype} is not allowed")
        array = np.frombuffer(tensors[node["ndarray"]].numpy().tobytes(), dtype=dtype).reshape(node["shape"]).copy()
        return array[()] if node["scalar"] else array
    raise ValueError(f"unknown JSON node {str(node)[:80]}")


def load_state(stem: str | Path) -> Any:
    """What `save_state(state, stem)` wrote. Reads JSON and safetensors only, never pickle."""
    from safetensors.torch import load_file

    json_file, tensor_file = Path(f"{stem}.json"), Path(f"{stem}.safetensors")
    try:
        doc = json.loads(json_file.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT}")
        tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
        return _decode(doc["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as e:
        raise CheckpointFormatError(
            f"{json_file} cannot be read as checkpoint state ({type(e).__name__}: {e}); the checkpoint is damaged. "
            "Delete that checkpoint directory to resume from an older one, or start over with --overwrite"
        ) from None


# ------------------------------------------------------------------------------ checkpoint directories


def process_stem(rank: int) -> str:
    return f"process-{rank}"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (partial ones are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name)))
    for _, p in reversed(steps):
        if artifacts.verify(p):
            return p
    return None


def remove_partial(root: Path) -> None:
    """Remove `.tmp-step-*` directories: checkpoints whose writing was killed or failed."""
    if root.is_dir():
        for p in root.iterdir():
            if PARTIAL_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def _is_expected(name: str, world: int) -> bool:
    """Whether `name` (relative to a checkpoint directory) is one of this format's files."""
    if name in (artifacts.MANIFEST, "state.json", "model.safetensors"):
        return True
    state = re.fullmatch(r"(optimizer|scheduler|objective|process-(\d+))\.(json|safetensors)", name)
    return state is not None and (state.group(2) is None or int(state.group(2)) < world)


def check_format(path: Path, rank: int) -> dict[str, Any]:
    """The checkpoint's state.json, once the directory is known to hold this format's files only
    (so nothing in it is ever unpickled); CheckpointFormatError otherwise."""
    foreign: list[str] = []
    try:
        meta = json.loads((path / "state.json").read_text())
        world = int(meta["world"])
        if meta.get("format") != FORMAT:
            foreign.append(f"state.json of format {meta.get('format', 1)}")
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))
        foreign += [n for n in names if not _is_expected(n, world)]
        needed = ["model.safetensors", *(f"{s}.json" for s in (*MAIN_STEMS, process_stem(rank)))]
        missing = [n for n in needed if not (path / n).is_file()]
    except (OSError, ValueError, KeyError, TypeError) as e:
        foreign, missing, meta = [f"an unreadable state.json ({e})"], [], {}
    if foreign or missing:
        found = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        lacks = f"lacks {', '.join(missing)}" if missing else ""
        raise CheckpointFormatError(
            f"checkpoint {path} " + " and ".join(x for x in (f"holds {found}" if foreign else "", lacks) if x)
            + ": it was written by an older version of rlhfzoo or is not in a safe format (only safetensors and JSON "
            "are read, never pickles). Start over with --overwrite, or resume it with the older rlhfzoo that wrote it"
        )
    return meta
