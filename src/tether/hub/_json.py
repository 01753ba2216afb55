"""JSON for the hub's HTTP answers: orjson when it can, the standard library when it cannot.

Answers carry what producers and runners sent (arguments, results), which the hub only ever
accepted as strict JSON, so orjson's one difference that matters, integers beyond 64 bits,
falls back to the standard library, rendering exactly as Starlette's ``JSONResponse`` does.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency of the hub
    orjson = None  # type: ignore[assignment]

__all__ = ["dumps"]


def dumps(value: Any) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:  # orjson.JSONEncodeError: an integer past 64 bits, say
            pass
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
