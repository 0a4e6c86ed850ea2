"""One contract test over every registered objective (built-in or installed)."""

import pytest

from rlhfzoo.registry import registry
from rlhfzoo.testing import check_objective

OBJECTIVES = [e.name for e in registry.entries("objective") if e.package != "tests"]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_contract(name, tmp_path):
    check_objective(name, tmp_path / name)
