"""Shared test set-up: one artifact cache for the whole session (the SFT policy is trained once
and reused by every test that needs it)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RLHFZOO_CACHE", str(REPO / ".cache" / "rlhfzoo-tests"))


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def example_plugin_env(tmp_path_factory):
    """Environment in which the third-party example plugin (examples/rlhfzoo-slic) is installed
    by pip, the way a user would, into its own directory on PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO / "examples" / "rlhfzoo-slic")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return {**os.environ, "PYTHONPATH": str(target)}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is much faster than two on a shared machine (no OpenMP
    barriers spinning against other processes). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_sentiment():
    """A `sentiment` task with small held-out splits, for the contract checks (which read them)."""
    from rlhfzoo.registry import registry

    return registry.create("task", "sentiment", {"n_test_prompts": 8, "n_test_demonstrations": 8})
