"""Run by test_trainer.py under torchrun: a few SFT steps, then each rank writes its parameters."""

import sys

import torch

from rlhfzoo.config import load_config
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer

out_dir, grad_accum = sys.argv[1], int(sys.argv[2])
cfg = load_config(
    data={
        "task": {"name": "sentiment"},
        "policy": dict(TINY_POLICY),
        "algorithm": {"name": "sft"},
        "train": {"steps": 3, "batch_size": 8, "grad_accum": grad_accum, "lr": 3e-3, "eval_prompts": 0, "progress": False},
        "output_dir": out_dir,
    }
)
trainer = Trainer(cfg, log=lambda *_: None)
if trainer.rank == 0:
    torch.save({k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}, f"{out_dir}-init.pt")
trainer.fit(overwrite=True)
state = {k: v.detach().cpu() for k, v in trainer.policy.module.state_dict().items()}
torch.save(state, f"{out_dir}/params-rank{trainer.rank}.pt")
if trainer.rank == 0:
    import os

    os.replace(f"{out_dir}-init.pt", f"{out_dir}/params-init.pt")
