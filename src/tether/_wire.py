"""JSON for isolation units, straight on CPython's ``_json`` accelerator.

Every unit decodes its requests and encodes its outcomes as JSON, and a new subinterpreter pays
for whatever that takes on the way to its first step. The :mod:`json` package imports :mod:`re`
(and with it ``enum``, ``functools``, ``collections``) only to skip whitespace: measured in an
isolated subinterpreter here, ``import json`` costs about 7 ms, more than every other import of
a unit together. This module drives the same C scanner and encoder that :mod:`json` itself uses,
with :mod:`json`'s defaults, so it produces the same bytes and the same values, and imports
nothing at all.

Anything off the happy path (a value JSON cannot carry, a malformed document) is handed to the
real :mod:`json`, imported then, so errors read exactly as :mod:`json`'s do.
"""

from __future__ import annotations

__all__ = ["dumps", "loads"]

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _ScannerContext:
    """What ``_json.make_scanner`` reads off a ``json.JSONDecoder()``: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


def _refuse(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


try:
    from _json import encode_basestring_ascii as _escape
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - a CPython built without json's accelerator
    _scan = None
else:
    _scan = _make_scanner(_ScannerContext())  # type: ignore[arg-type]  # read duck-typed


def dumps(obj: object) -> bytes:
    """``json.dumps(obj, separators=(",", ":")).encode()``."""
    if _scan is not None:
        # The arguments of json's own call for json.dumps(obj, separators=(",", ":")): markers,
        # default, string encoder, indent, key and item separators, sort_keys, skipkeys,
        # allow_nan. A new encoder each time, as json makes: its markers hold state.
        encode = _make_encoder({}, _refuse, _escape, None, ":", ",", False, False, True)
        try:
            return "".join(encode(obj, 0)).encode()
        except (TypeError, ValueError, RecursionError):
            pass  # json raises it again, in its own words
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | str) -> object:
    """``json.loads(data)`` for a UTF-8 (or already decoded) document."""
    if _scan is not None:
        try:
            text = data if isinstance(data, str) else str(data, "utf-8")
            start = len(text) - len(text.lstrip(_WHITESPACE))
            value, end = _scan(text, start)
            if not text[end:].strip(_WHITESPACE) and not text.startswith("\ufeff"):
                return value
        except (StopIteration, ValueError, RecursionError):
            pass
    import json

    return json.loads(data)
