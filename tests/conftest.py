"""Shared test set-up: one artifact cache for the whole session (the SFT policy is trained once
and reused by every test that needs it)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RLHFZOO_CACHE", str(REPO / ".cache" / "rlhfzoo-tests"))
