"""The built-in corpora that ship with Python: calibration, training and evaluation parts share no document, large
corpora give evenly spread samples of about the size asked for, and every reading is the same text."""

from __future__ import annotations

from itertools import combinations

import pytest

from mfakit.texts import BUILTINS, PARTS, _spread_order, builtin_texts, fingerprint, stdlib_modules


@pytest.mark.parametrize("name", BUILTINS)
def test_parts_share_no_document(name):
    sample = None if name == "pydoc" else (3000, 120_000)
    parts = {part: builtin_texts(name, part, sample) for part in PARTS}
    assert all(parts.values())
    for a, b in combinations(PARTS, 2):
        # Documents are split by path; only tiny files that exist at two paths (a package marker, a hello-world
        # example) can give two parts the same text.
        assert all(len(text) < 200 for text in set(parts[a]) & set(parts[b])), (a, b)
    assert fingerprint(builtin_texts(name, "evaluation", sample)) == fingerprint(parts["evaluation"])


def test_every_document_is_in_one_part_and_the_evaluation_part_is_the_old_held_out_split():
    from pydoc_data.topics import topics

    parts = {part: builtin_texts("pydoc", part) for part in PARTS}
    assert sorted(t for texts in parts.values() for t in texts) == sorted(topics.values())
    assert parts["evaluation"] == [topics[k] for i, k in enumerate(sorted(topics)) if i % 5 == 2]
    assert 0.35 < len(parts["training"]) / len(topics) < 0.45 and 0.35 < len(parts["calibration"]) / len(topics) < 0.45


def test_source_code_is_sampled_evenly_as_heads_of_documents():
    modules = stdlib_modules()
    assert len(modules) > 200 and not [m for m in modules if "test" in m.parts or "site-packages" in m.parts]
    sample = builtin_texts("stdlib", "calibration", (3000, 120_000))
    whole = builtin_texts("stdlib", "calibration")
    assert 120_000 <= sum(map(len, sample)) < 123_000 and all(len(t) <= 3000 for t in sample) and len(sample) >= 40
    heads = [w[:3000] for w in whole]
    positions = [heads.index(t) for t in sample]
    assert positions == sorted(positions)  # the sample keeps the corpus order
    assert positions[0] < len(whole) / 10 and positions[-1] > 0.9 * len(whole)  # and spans the corpus
    order = _spread_order(10)
    assert sorted(order) == list(range(10)) and order[:2] == [0, 8] and sorted(order[:4]) == [0, 2, 4, 8]
