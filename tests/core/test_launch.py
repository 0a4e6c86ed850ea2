"""The accelerate configs in configs/accelerate: valid for accelerate, and the CPU recipe really starts two processes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def test_accelerate_configs_load_with_accelerates_own_reader():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"cpu-2proc", "fsdp", "deepspeed-zero2"}
    for f in files:
        config = load_config_from_file(str(f))  # a dataclass: an unknown key is a TypeError
        assert config.num_processes >= 2, f


@pytest.mark.slow
def test_cpu_recipe_starts_two_processes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from accelerate import Accelerator\n"
        "a = Accelerator(cpu=True)\n"
        "print(f'rank {a.process_index} of {a.num_processes} {a.distributed_type.value}', flush=True)\n"
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu-2proc.yaml"), str(probe)]
    r = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = sorted(re.findall(r"rank \d of \d [A-Z_]+", r.stdout))  # the two processes' prints may interleave
    assert lines == ["rank 0 of 2 MULTI_CPU", "rank 1 of 2 MULTI_CPU"], r.stdout
