"""The built-in corpora that ship with Python: calibration and evaluation parts share no document, large corpora
give evenly spread samples of about the size asked for, and every reading is the same text."""

from __future__ import annotations

import pytest

from mfakit.texts import BUILTINS, _spread_order, builtin_texts, fingerprint, stdlib_modules


@pytest.mark.parametrize("name", BUILTINS)
def test_parts_share_no_document(name):
    budget = None if name == "pydoc" else 300_000
    calibration = builtin_texts(name, "calibration", budget)
    evaluation = builtin_texts(name, "evaluation", budget)
    assert calibration and evaluation and not set(calibration) & set(evaluation)
    assert fingerprint(builtin_texts(name, "evaluation", budget)) == fingerprint(evaluation)


def test_source_code_is_sampled_evenly_to_the_budget():
    modules = stdlib_modules()
    assert len(modules) > 200 and not [m for m in modules if "test" in m.parts or "site-packages" in m.parts]
    sample = builtin_texts("stdlib", "calibration", 200_000)
    whole = builtin_texts("stdlib", "calibration")
    assert 200_000 <= sum(map(len, sample)) < sum(map(len, whole)) / 4
    assert [t for t in whole if t in sample] == sample  # the sample keeps the corpus order
    order = _spread_order(10)
    assert sorted(order) == list(range(10)) and order[:2] == [0, 8] and sorted(order[:4]) == [0, 2, 4, 8]
