"""Shared plumbing of the pairwise objectives (`rlhfzoo.plugins._preference`): what a run is
told about pairs that cannot teach anything."""

import logging

import pytest

from rlhfzoo.interfaces import PreferencePair
from rlhfzoo.registry import registry


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_identical_pairs_are_counted_and_shown_once(name, caplog):
    with_reference = name in ("dpo", "ipo")  # simpo and orpo are reference-free
    objective = registry.create("objective", name, {"reference": "model"} if with_reference else {})
    data = [PreferencePair(f"q{i}", f"good {i}", f"bad {i}") for i in range(5)]
    data += [PreferencePair("q", "same", "same")] * 2
    with caplog.at_level(logging.WARNING):
        objective.prepare(data, collate=None, reference=None)
    assert objective.reference_needed_in_training() == with_reference  # `reference: model`
    shown = [r.getMessage() for r in caplog.records]
    assert shown == [
        f"{name}: 2 of 7 preference pairs have identical chosen and rejected responses; they express no "
        "preference and are masked out of the preference loss (counted as `skipped_pairs`)"
    ]


def test_no_message_without_identical_pairs(caplog):
    objective = registry.create("objective", "dpo", {"reference": "model"})
    with caplog.at_level(logging.INFO):
        objective.prepare([PreferencePair("q", "a", "b")], collate=None, reference=None)
    assert caplog.records == []
