"""The units' JSON codec (tether._wire) reads and writes exactly what the json module does."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether import _wire

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**200)
    | st.floats()
    | st.text()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text() | st.integers() | st.booleans() | st.none(), inner, max_size=5)
    ),
    max_leaves=30,
)


def reference(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to itself (both sides decode the same document)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(VALUES)
def test_encodes_byte_for_byte_like_json(value: Any) -> None:
    assert _wire.dumps(value) == reference(value)


@given(VALUES, st.sampled_from(["", " ", "\n\t ", "\r"]))
def test_decodes_like_json(value: Any, padding: str) -> None:
    document = padding + reference(value).decode() + padding
    assert same(_wire.loads(document), json.loads(document))
    assert same(_wire.loads(document.encode()), json.loads(document.encode()))


def outcome(fn: Any, arg: Any) -> str:
    try:
        return repr(fn(arg))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(
    "document",
    ["", "  ", "[1,", "1 2", '{"a" 1}', "\ufeff1", "nul", '"\\x"', b"\xff", b"\x00\x00\x001"],
)
def test_a_malformed_document_fails_as_json_fails(document: str | bytes) -> None:
    assert outcome(_wire.loads, document) == outcome(json.loads, document)


@given(st.text())
def test_any_text_decodes_or_fails_as_json_does(document: str) -> None:
    assert outcome(_wire.loads, document) == outcome(json.loads, document)


def test_a_value_json_cannot_carry_fails_as_json_fails() -> None:
    circular: list[Any] = []
    circular.append(circular)
    for value in ({1j: 1}, {"a": object()}, {1, 2}, circular, b"bytes"):
        assert outcome(_wire.dumps, value) == outcome(reference, value)
