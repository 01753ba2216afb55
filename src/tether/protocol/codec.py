"""JSON codec for protocol messages, with explicit size limits.

:func:`encode` turns a message into the bytes of one frame; :func:`decode` turns the bytes (or
text) of one frame into a typed message, checking every field against the message's
annotations. Anything else, whatever the bytes, raises :class:`~tether.exceptions.ProtocolError`
with the WebSocket close code to send: never another exception.

Frames are parsed by orjson when it is installed and the frame is one it reads exactly as the
standard library does; every other frame (and every frame orjson refuses) goes through the
standard library's parser, which alone decides what is an error and what it says. Encoding
always uses the standard library: its float formatting is the wire format.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import reprlib
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ..exceptions import ProtocolError
from .messages import MESSAGE_TYPES, Assignment, ErrorInfo, FunctionInfo, Message, Outcome, RunRef

try:  # optional: about 6x faster parsing; it does not load in a subinterpreter, and need not
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency of the hub and runner
    _orjson = None  # type: ignore[assignment]

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "CloseCode", "decode", "encode", "encode_split", "loads"]

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class CloseCode(enum.IntEnum):
    """WebSocket close codes (RFC 6455 §7.4.1, and 4000-4999 for our own)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    HANDSHAKE_TIMEOUT = 4001
    HEARTBEAT_TIMEOUT = 4002
    VERSION_MISMATCH = 4003
    SUPERSEDED = 4004  # the same runner id connected again
    SLOW_CONSUMER = 4005  # our outgoing queue to the peer overflowed


_RECORDS = (RunRef, FunctionInfo, ErrorInfo, Assignment, Outcome)


def _record(value: Any) -> Any:
    # Only our own records become objects; anything else in a payload is not JSON. Payloads
    # (args, kwargs, value) are left to the C encoder, so their depth costs no Python recursion.
    if isinstance(value, _RECORDS):
        return {name: getattr(value, name) for name in _names(type(value))}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, ensure_ascii=False, default=_record
)


_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode(message: Message) -> bytes:
    """The frame for ``message``. ValueError/TypeError if a payload value is not JSON."""
    body = {name: getattr(message, name) for name in _names(type(message))}
    body["type"] = message.type
    try:
        return _ENCODER.encode(body).encode()
    except RecursionError:
        raise ValueError("payload is nested too deeply to encode") from None


def encode_split[T](
    make: Callable[[tuple[T, ...]], Message], items: Sequence[T], max_bytes: int
) -> list[bytes]:
    """The frames of ``make(items)``: one, unless it would exceed ``max_bytes``; then the items
    are split in halves until each frame fits (an item too big on its own goes alone, and the
    peer's limit decides). ValueError/TypeError as :func:`encode`."""
    frame = encode(make(tuple(items)))
    if len(frame) <= max_bytes or len(items) < 2:
        return [frame]
    half = len(items) // 2
    return encode_split(make, items[:half], max_bytes) + encode_split(make, items[half:], max_bytes)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0:  # inf (1e999); NaN cannot be written as a number
        raise ValueError(f"{text[:20]} overflows a float")
    return value


# A lone surrogate can only come from a \uD800-\uDFFF escape, or from text that was never UTF-8.
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
# orjson reads an integer beyond 64 bits (below -2**63 or above 2**64 - 1) as a float; the
# standard library keeps it an integer. Frames with such a number (or any 19 digits in a row,
# which every one of them has) take the standard path.
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")


def _loads_stdlib(data: bytes | bytearray | memoryview | str) -> Any:
    text = data if isinstance(data, str) else bytes(data).decode()
    obj = json.loads(text, parse_constant=_constant, parse_float=_finite)
    if _MAYBE_SURROGATE.search(text):
        _ENCODER.encode(obj).encode()  # UnicodeEncodeError for a lone surrogate
    return obj


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Strict JSON: no NaN or infinities, no lone surrogates, UTF-8 only; ValueError (or
    RecursionError) otherwise. Integers of any size stay integers."""
    if _orjson is not None:
        long_digits = _LONG_DIGITS_TEXT if isinstance(data, str) else _LONG_DIGITS_BYTES
        if not long_digits.search(data):  # type: ignore[arg-type]
            try:
                # orjson refuses NaN, infinities (1e999 included), lone surrogates, invalid
                # UTF-8 and nesting past 1,024 levels: all of those take the standard path,
                # which refuses the same things with its own messages (and accepts deep nesting).
                return _orjson.loads(data)
            except _orjson.JSONDecodeError:
                pass
    return _loads_stdlib(data)


def decode(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """The message in one frame, or :class:`ProtocolError` naming what is wrong with it."""
    size = len(data)
    if isinstance(data, str) and size <= max_bytes < 4 * size:
        size = len(data.encode("utf-8", "surrogatepass"))  # the limit is in bytes, not chars
    if size > max_bytes:
        raise ProtocolError(
            CloseCode.MESSAGE_TOO_BIG, f"message of {size} bytes exceeds {max_bytes}"
        )
    try:
        obj = loads(data)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeError and ints over 4300 digits.
        raise ProtocolError(CloseCode.INVALID_PAYLOAD, f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "frame is not a JSON object")
    kind = obj.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"unknown message type {_REPR.repr(kind)}")
    return _BUILDERS[cls](obj, kind)  # type: ignore[no-any-return]


# Field validation, compiled once per class from its annotations. A check takes the value and
# where it sits in two parts ("hello.functions[0]" and ".name"), joined only when an error
# names them: decoding a valid frame builds no strings.

Check = Callable[[Any, str, str], Any]


_REPR = reprlib.Repr(maxlevel=3, maxstring=60, maxlong=60, maxother=60)


def _fail(where: str, expected: str, value: Any) -> ProtocolError:
    shown = _REPR.repr(value)  # bounded: values may be huge or deeply nested
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ProtocolError(CloseCode.PROTOCOL_ERROR, f"{where} must be {expected}, got {shown}")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _scalar(tp: type, expected: str) -> Check:
    def check(value: Any, where: str, name: str) -> Any:
        kind = type(value)
        if kind is tp and (kind is not int or _INT64_MIN <= value <= _INT64_MAX):
            return value  # the common case, first
        # bool is an int in Python but not in our schema
        if kind is bool and tp is not bool:
            raise _fail(where + name, expected, value)
        if tp is float and kind is int:
            try:
                return float(value)
            except OverflowError:
                raise _fail(where + name, expected, value) from None
        if kind is int and tp is int:
            # out of range, so that ms / 1000 or an SQLite column never overflows
            raise _fail(where + name, "a 64-bit integer", value)
        if not isinstance(value, tp):
            raise _fail(where + name, expected, value)
        return value

    return check


def _any(value: Any, where: str, name: str) -> Any:
    return value


def _compile(tp: Any) -> Check:
    if tp is Any:
        return _any
    if tp in (str, int, float, bool):
        return _scalar(tp, _EXPECTED[tp])
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, tp
        check_inner = _compile(inner[0])

        def optional(value: Any, where: str, name: str) -> Any:
            return None if value is None else check_inner(value, where, name)

        return optional
    if origin is tuple:
        check_item = _compile(args[0])

        def sequence(value: Any, where: str, name: str) -> Any:
            if not isinstance(value, list):
                raise _fail(where + name, "a list", value)
            try:  # a dispatch or result may carry hundreds of runs: no string per item
                return tuple([check_item(v, "", "") for v in value])
            except ProtocolError:
                pass
            # Check again, naming where each item sits: this raises the error, with its path.
            at = where + name
            return tuple(check_item(v, at, f"[{i}]") for i, v in enumerate(value))

        return sequence
    if origin is list:

        def array(value: Any, where: str, name: str) -> Any:
            if not isinstance(value, list):
                raise _fail(where + name, "a list", value)
            return value

        return array
    if origin is dict:

        def mapping(value: Any, where: str, name: str) -> Any:
            if not isinstance(value, dict):
                raise _fail(where + name, "an object", value)
            return value

        return mapping
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        build = _builder(tp)

        def nested(value: Any, where: str, name: str) -> Any:
            if not isinstance(value, dict):
                raise _fail(where + name, "an object", value)
            return build(value, where + name)

        return nested
    raise TypeError(f"no codec for {tp!r}")  # a programming error in messages.py


def _builder(cls: type) -> Callable[[dict[str, Any], str], Any]:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, "." + f.name, _compile(hints[f.name]), required))

    def build(obj: dict[str, Any], where: str) -> Any:
        values = {}
        for name, dotted, check, required in fields:
            if name in obj:
                values[name] = check(obj[name], where, dotted)
            elif required:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"{where}: missing field {name!r}")
        # Unknown fields are ignored so that a newer peer can add optional fields.
        return cls(**values)

    return build


_BUILDERS: dict[type, Callable[[dict[str, Any], str], Any]] = {
    cls: _builder(cls) for cls in MESSAGE_TYPES.values()
}
