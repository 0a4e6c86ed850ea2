"""rlhfzoo.checkpoint: checkpoint state in formats that cannot run code (tensors in safetensors,
the rest in JSON), restored bit for bit, and checkpoints holding anything else refused."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfzoo import artifacts
from rlhfzoo.checkpoint import CheckpointFormatError, load_state, rng_state, save_state, set_rng_state
from rlhfzoo.config import load_config
from rlhfzoo.registry import registry
from rlhfzoo.testing import contract_config
from rlhfzoo.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sft(out, **train):
    data = contract_config("sft", out, reward=None)
    data["train"].update(train)
    return load_config(data=data)


class CreatesAFile:
    """Unpickling this runs `open(marker, "w")`: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.slow  # a subprocess or a few seconds of training: not in the fast tier
def test_a_checkpoint_holding_a_pickle_is_refused_without_unpickling_it(tmp_path):
    out = tmp_path / "run"
    Trainer(sft(out, steps=4, stop_after=2), log=lambda *_: None).fit()
    ckpt = out / "checkpoints" / "step-000002"
    marker = tmp_path / "code-ran"
    torch.save(CreatesAFile(marker), ckpt / "optimizer.pt")  # a pickle inside torch's zip format
    (ckpt / artifacts.MANIFEST).unlink()
    artifacts.write_manifest(ckpt, {"step": 2})  # anyone can regenerate a manifest
    with pytest.raises(TrainingError, match=r"optimizer\.pt.*older version.*--overwrite"):
        Trainer(sft(out, steps=4), log=lambda *_: None).fit(resume=True)
    assert not marker.exists()


def test_a_checkpoint_is_safetensors_and_json_and_replaces_partial_ones(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(sft(out, steps=2), log=lambda *_: None)
    trainer.prepare_output(resume=False, overwrite=False)
    stale = out / "checkpoints" / ".tmp-step-000007"  # left by a run killed while writing step 7
    stale.mkdir(parents=True)
    (stale / "optimizer.json").write_text("{")
    trainer.train_step(0)
    trainer.step = 1
    ckpt = trainer.save_checkpoint()
    assert not stale.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "MANIFEST.json", "model.safetensors", "objective.json", "optimizer.json", "optimizer.safetensors",
        "process-0.json", "process-0.safetensors", "scheduler.json", "state.json",
    ]


# ------------------------------------------------------------------------------ the format, bit for bit


def roundtrip(state, tmp_path, name="state"):
    save_state(state, tmp_path / name)
    return load_state(tmp_path / name)


def assert_identical(a, b, where="state"):
    """Same types (tuples stay tuples, int keys stay ints) and the same values, bit for bit."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} came back as {b!r}"


def tiny_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, x):
    model(x).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_optimizer_and_scheduler_state_round_trip_bit_for_bit(tmp_path):
    model, optimizer, scheduler = tiny_training()
    x = torch.randn(8, 3)
    for _ in range(3):
        train_step(model, optimizer, scheduler, x)
    opt_state, sched_state = optimizer.state_dict(), scheduler.state_dict()
    assert isinstance(next(iter(opt_state["state"])), int)  # what plain JSON would turn into "0"
    assert_identical(opt_state, roundtrip(opt_state, tmp_path, "optimizer"))
    assert_identical(sched_state, roundtrip(sched_state, tmp_path, "scheduler"))

    # A fresh copy loaded from the files takes the very same next step.
    copy, copy_opt, copy_sched = tiny_training(seed=1)
    copy.load_state_dict(model.state_dict())
    copy_opt.load_state_dict(load_state(tmp_path / "optimizer"))
    copy_sched.load_state_dict(load_state(tmp_path / "scheduler"))
    train_step(model, optimizer, scheduler, x)
    train_step(copy, copy_opt, copy_sched, x)
    for p, q in zip(model.parameters(), copy.parameters()):
        assert torch.equal(p, q)
    assert_identical(optimizer.state_dict(), copy_opt.state_dict())


def test_rng_states_round_trip_and_restore_the_same_draws(tmp_path):
    state = rng_state()
    assert isinstance(state["python"], tuple) and isinstance(state["numpy"], tuple)
    back = roundtrip(state, tmp_path)
    assert_identical(state, back)
    draws = lambda: (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())  # noqa: E731
    first = draws()
    set_rng_state(back)  # random.setstate and np.random.set_state accept what came back
    assert draws() == first


@pytest.mark.parametrize("name", [e.name for e in registry.entries("objective") if e.package != "tests"])
def test_objective_state_round_trips(name, tmp_path):
    entry = registry.get("objective", name)
    objective = entry.cls(entry.cls.Config())
    state = objective.state_dict()
    back = roundtrip(state, tmp_path)
    assert_identical(state, back)
    objective.load_state_dict(back)
    assert_identical(state, objective.state_dict())


def test_numbers_keep_their_type_and_bits(tmp_path):
    state = {
        1: (0.1, float("inf"), -0.0, 2**70, True, None, "x"),
        "arrays": [np.arange(5, dtype=np.uint32), np.float64(0.3), np.zeros((2, 0), dtype=np.int8)],
        (1, 2): torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    assert_identical(state, roundtrip(state, tmp_path))


def test_a_value_that_is_not_data_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"objective\[.totals.\]: a set cannot be stored"):
        save_state({"totals": {1, 2}}, tmp_path / "objective", "objective")
    with pytest.raises(TypeError, match="dtype object"):
        save_state(np.array([object()]), tmp_path / "objective")


@pytest.mark.parametrize("skeleton", [
    {"callable": "os.system"},
    {"list": [{"tensor": "t9"}]},
    {"ndarray": "t0", "dtype": "|O", "shape": [1], "scalar": False},
    [1, 2],
])
def test_crafted_json_is_refused(tmp_path, skeleton):
    (tmp_path / "objective.json").write_text(json.dumps({"format": 2, "state": skeleton}))
    with pytest.raises(CheckpointFormatError, match=r"objective\.json cannot be read as checkpoint state"):
        load_state(tmp_path / "objective")
