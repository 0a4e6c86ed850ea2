"""`train.cpu_allocator`: glibc keeps freed memory (rlhfzoo.cpu_memory). Each test runs in a fresh
process, since the setting is process-wide and stays."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.slow,  # fresh processes
    pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"),
]


def run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_activations_are_reused_instead_of_mapped_again():
    """A step-like pattern (tensors of 0.25-8 MiB made and freed out of order): with the thresholds
    fixed, a round maps (page-faults) far less fresh memory than with glibc's defaults."""
    out = run("""
        import json, random, resource, torch
        from rlhfzoo import cpu_memory

        def faults_of_rounds(rounds=6):
            rng = random.Random(0)
            def one_round():
                live = []
                for _ in range(60):
                    live.append(torch.ones(rng.choice([64, 256, 512, 1024, 2048]) * 1024))
                    if len(live) > 20:
                        live.pop(rng.randrange(len(live)))
            one_round()  # warm up
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(rounds):
                one_round()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        default = faults_of_rounds()
        assert not cpu_memory.applied()
        assert cpu_memory.keep_freed_memory() and cpu_memory.applied()
        print(json.dumps({"default": default, "kept": faults_of_rounds()}))
    """)
    assert out["kept"] * 5 < out["default"], out


def test_training_is_bit_identical_and_the_option_decides():
    """The same run trained with `cpu_allocator: system` and then (in the same process) with the
    default `keep-freed`: bit-identical weights; only the second sets the thresholds."""
    out = run("""
        import json, tempfile
        from pathlib import Path
        from safetensors.torch import load_file
        from rlhfzoo import cpu_memory
        from rlhfzoo.config import load_config
        from rlhfzoo.testing import TINY_POLICY
        from rlhfzoo.trainer import Trainer

        def train(allocator):
            out = Path(tempfile.mkdtemp()) / "run"
            train = {"steps": 4, "batch_size": 4, "lr": 3e-3, "eval_prompts": 0, "progress": False, "num_threads": 1}
            if allocator:
                train["cpu_allocator"] = allocator
            cfg = {"task": {"name": "sentiment"}, "policy": dict(TINY_POLICY), "algorithm": {"name": "sft"},
                   "train": train, "output_dir": str(out)}
            Trainer(load_config(data=cfg), log=None).fit()
            return load_file(str(out / "policy" / "model.safetensors")), cpu_memory.applied()

        system, after_system = train("system")
        kept, after_default = train(None)
        same = sorted(system) == sorted(kept) and all(system[k].equal(kept[k]) for k in system)
        print(json.dumps({"after_system": after_system, "after_default": after_default, "same": same}))
    """)
    assert out == {"after_system": False, "after_default": True, "same": True}
