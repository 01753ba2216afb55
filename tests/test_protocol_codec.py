"""The wire codec without sockets: every message round-trips, and any frame a peer can send
either decodes or raises :class:`ProtocolError` with a close code, never another exception."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.exceptions import ProtocolError
from tether.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HUB_MESSAGES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    RUNNER_MESSAGES,
    Ack,
    Assignment,
    Cancel,
    CloseCode,
    Closing,
    Dispatch,
    Draining,
    ErrorInfo,
    Extend,
    FunctionInfo,
    Heartbeat,
    Hello,
    Message,
    Outcome,
    Result,
    ResultAck,
    RunRef,
    Welcome,
    decode,
    encode,
    encode_split,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | FLOATS | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
"""What a payload (args, kwargs, value, options) may hold: JSON as Python decodes it."""


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for one annotation of messages.py, so new fields are covered as they come."""
    if tp is Any:
        return JSON_VALUES
    if tp is str:
        return st.text()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return INT64
    if tp is float:
        return FLOATS
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a) for a in args))
    if tp is type(None):
        return st.none()
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=5)
    if origin is dict:
        return st.dictionaries(st.text(), strategy_for(args[1]), max_size=5)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(tp)}
        return st.builds(tp, **fields)
    raise AssertionError(f"no strategy for {tp!r}: extend strategy_for")


MESSAGES = st.one_of(*(strategy_for(cls) for cls in MESSAGE_TYPES.values()))


def valid(code: int) -> bool:
    return code in set(CloseCode)


def decodes_cleanly(data: bytes | str, **kwargs: Any) -> Message | ProtocolError:
    """``decode(data)``, or the ProtocolError it raised; whatever decodes encodes again."""
    try:
        message = decode(data, **kwargs)
    except ProtocolError as exc:
        assert valid(exc.code), exc
        assert exc.reason and len(exc.reason) < 200, exc.reason
        return exc
    assert isinstance(message, Message)
    # Closure: a decoded message can be forwarded (the hub re-sends args and results).
    assert decode(encode(message)) == message
    return message


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def heartbeat(**overrides: Any) -> str:
    return frame(**({"type": "heartbeat", "seq": 1, "free_slots": 2, "in_flight": 0} | overrides))


def result(**overrides: Any) -> str:
    """A result frame carrying one outcome, with ``overrides`` in that outcome."""
    fields = {"run_id": "r1", "attempt": 1, "ok": True, "value": None}
    return frame(type="result", outcomes=[fields | overrides])


def succeeded(value: Any = None, **fields: Any) -> Result:
    return Result(outcomes=(Outcome(run_id="r1", attempt=1, ok=True, value=value, **fields),))


def hello(**overrides: Any) -> str:
    fields = {"type": "hello", "runner_id": "w1", "host": "h", "pid": 1, "slots": 1}
    return frame(**(fields | {"functions": [{"name": "f"}]} | overrides))


def dispatch(**overrides: Any) -> str:
    """A dispatch frame carrying one run, with ``overrides`` in that run."""
    fields = {"run_id": "r", "attempt": 1, "function": "f", "args": [], "kwargs": {}}
    return frame(type="dispatch", lease_ms=1, runs=[fields | overrides])


def assert_error(data: bytes | str, code: int, *fragments: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == code, info.value
    for fragment in fragments:
        assert fragment in info.value.reason
    return info.value


# Round trips


def test_message_tables_cover_each_type_once() -> None:
    assert set(RUNNER_MESSAGES).isdisjoint(HUB_MESSAGES)
    assert set(MESSAGE_TYPES.values()) == set(RUNNER_MESSAGES) | set(HUB_MESSAGES)
    assert all(MESSAGE_TYPES[cls.type] is cls for cls in MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", MESSAGE_TYPES.values(), ids=lambda cls: cls.type)
@given(data=st.data())
def test_every_message_round_trips(cls: type[Message], data: st.DataObject) -> None:
    message = data.draw(strategy_for(cls))
    encoded = encode(message)
    assert isinstance(encoded, bytes)
    assert json.loads(encoded)["type"] == cls.type
    assert decode(encoded) == message
    assert decode(encoded.decode()) == message  # text frames too
    assert type(decode(encoded)) is cls


@given(MESSAGES)
def test_encoding_is_compact_utf8_json_object(message: Message) -> None:
    encoded = encode(message)
    obj = json.loads(encoded.decode("utf-8"))
    assert obj.pop("type") == message.type
    assert set(obj) == {f.name for f in dataclasses.fields(message)}
    assert (
        encoded
        == json.dumps(
            {**obj, "type": message.type}, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )


def test_nested_records_round_trip() -> None:
    message = Hello(
        runner_id="w1",
        host="h",
        pid=7,
        slots=4,
        functions=(
            FunctionInfo(name="a", concurrency=2, timeout=1.5, options={"x": [1, {"y": None}]}),
            FunctionInfo(name="b", isolation="interpreter", reason="auto: pure Python"),
        ),
        in_flight=(RunRef(run_id="r1", attempt=3),),
        draining=True,
    )
    assert decode(encode(message)) == message
    error = ErrorInfo(type="KeyError", message="'k'", traceback="Traceback...", retryable=False)
    failed = Result(outcomes=(Outcome(run_id="r", attempt=1, ok=False, error=error),))
    assert decode(encode(failed)) == failed
    several = Result(outcomes=(*failed.outcomes, *succeeded([1, "x"]).outcomes))
    assert decode(encode(several)) == several


def test_defaults_fill_omitted_fields() -> None:
    message = decode(hello())
    assert message == Hello(
        runner_id="w1", host="h", pid=1, slots=1, functions=(FunctionInfo(name="f"),)
    )
    assert message.version == PROTOCOL_VERSION
    assert message.in_flight == () and message.draining is False
    assert decode('{"type":"draining"}') == Draining()


def test_unknown_fields_are_ignored_for_newer_peers() -> None:
    message = decode(heartbeat(future_field={"a": 1}))
    assert message == Heartbeat(seq=1, free_slots=2, in_flight=0)
    nested = decode(hello(functions=[{"name": "f", "future": True}]))
    assert isinstance(nested, Hello)
    assert nested.functions == (FunctionInfo(name="f"),)


def test_integer_for_a_float_field_becomes_a_float() -> None:
    message = decode(result(duration_ms=5))
    assert isinstance(message, Result)
    duration = message.outcomes[0].duration_ms
    assert duration == 5.0 and type(duration) is float


def test_non_ascii_is_sent_as_utf8() -> None:
    encoded = encode(Cancel(run_id="ré—😀", attempt=1))
    assert "ré—😀".encode() in encoded
    assert decode(encoded) == Cancel(run_id="ré—😀", attempt=1)


def test_deep_payload_round_trips() -> None:
    nested: list[Any] = []
    for _ in range(2_000):
        nested = [nested]
    message = dispatch_with(args=[nested])
    assert decode(encode(message)) == message


def test_tuples_in_payloads_are_sent_as_lists() -> None:
    assert decode(encode(succeeded((1, (2, 3))))) == succeeded([1, [2, 3]])


# What encode refuses (the client and the runner turn these into errors for the caller)


def dispatch_with(args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Dispatch:
    run = Assignment(run_id="r", attempt=1, function="f", args=args or [], kwargs=kwargs or {})
    return Dispatch(runs=(run,), lease_ms=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_non_finite_numbers(bad: float) -> None:
    with pytest.raises(ValueError):
        encode(dispatch_with(args=[1, [bad]]))
    with pytest.raises(ValueError):
        encode(dispatch_with(kwargs={"x": {"y": bad}}))
    with pytest.raises(ValueError):
        encode(succeeded(bad))
    with pytest.raises(ValueError):
        encode(succeeded(duration_ms=bad))


@dataclasses.dataclass
class UserRecord:
    x: int


@pytest.mark.parametrize(
    "bad", [object(), {1, 2}, b"bytes", UserRecord(1), 1 + 2j, range(3)], ids=repr
)
def test_encode_refuses_non_json_values(bad: Any) -> None:
    with pytest.raises(TypeError):
        encode(dispatch_with(args=[bad]))
    with pytest.raises(TypeError):
        encode(dispatch_with(kwargs={"k": [bad]}))
    with pytest.raises(TypeError):
        encode(succeeded({"v": bad}))


def test_encode_refuses_what_json_cannot_carry() -> None:
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError):
        encode(dispatch_with(args=circular))
    with pytest.raises(ValueError):  # UnicodeEncodeError: a lone surrogate is not UTF-8
        encode(dispatch_with(args=["\ud800"]))
    with pytest.raises(ValueError):  # more than the 4300 digits int() may print
        encode(dispatch_with(args=[10**5000]))
    too_deep: list[Any] = []
    for _ in range(100_000):
        too_deep = [too_deep]
    with pytest.raises(ValueError):  # not RecursionError
        encode(dispatch_with(args=too_deep))


# Any frame decodes or raises ProtocolError


@given(st.binary())
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    decodes_cleanly(data)


@given(st.text(st.characters(codec=None, exclude_categories=())))  # surrogates included
def test_any_text_decodes_or_raises_protocol_error(text: str) -> None:
    decodes_cleanly(text)


TOKENS = st.sampled_from(
    [*'{}[],:" \\\x00\ufeff', "\ud800", "0", "-1", "1.5", "true", "false", "null"]
    + ['"type"', '"hello"', '"heartbeat"', '"result"', '"seq"', '"run_id"', '"value"']
    + ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "9" * 400, "9" * 5000]
    + ['"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"']
)
"""Pieces of JSON, some of them poisonous, to reach the parser's corners more often than
random bytes do."""


@given(st.lists(TOKENS, max_size=40).map("".join))
def test_json_like_text_decodes_or_raises_protocol_error(text: str) -> None:
    decodes_cleanly(text)
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        decodes_cleanly(text.encode())


@given(
    kind=st.sampled_from(sorted(MESSAGE_TYPES)),
    fields=st.dictionaries(
        st.sampled_from(
            sorted({f.name for c in MESSAGE_TYPES.values() for f in dataclasses.fields(c)})
        ),
        JSON_VALUES,
    ),
)
def test_objects_with_a_known_type_decode_or_raise_protocol_error(
    kind: str, fields: dict[str, Any]
) -> None:
    outcome = decodes_cleanly(json.dumps({"type": kind, **fields}))
    if isinstance(outcome, ProtocolError):
        assert outcome.code == CloseCode.PROTOCOL_ERROR
        assert outcome.reason.startswith(kind)  # names the field: "<type>.<field>..."


@given(message=MESSAGES, data=st.data())
def test_corrupted_frames_decode_or_raise_protocol_error(
    message: Message, data: st.DataObject
) -> None:
    encoded = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(encoded) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            encoded[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "delete" and len(encoded) > 1:
            del encoded[at]
        else:
            encoded.insert(at, data.draw(st.integers(0, 255)))
    decodes_cleanly(bytes(encoded))


@given(st.text())
def test_text_and_its_utf8_bytes_decode_alike(text: str) -> None:
    as_text = decodes_cleanly(text)
    as_bytes = decodes_cleanly(text.encode())
    if isinstance(as_text, ProtocolError):
        assert isinstance(as_bytes, ProtocolError) and as_bytes.code == as_text.code
    else:
        assert as_bytes == as_text


@pytest.mark.parametrize(
    "data",
    [
        "[" * 100_000,
        "{" * 100_000,
        '{"a":' * 100_000,
        "[" * 100_000 + "]" * 100_000,
        b"[" * 100_000,
        "1" * 5_000,
        '{"type":"result","value":' + "9" * 5_000 + "}",
        "1e999",
        '{"type":"closing","reason":"\ud800"}',  # a lone surrogate in the text itself
        b'{"type":"closing","reason":"\xed\xa0\x80"}',  # ... or encoded in the bytes
        '{"type":"closing","reason":"\\ud800"}',  # ... or as an escape
        '{"type":"closing","reason":"\\udc00\\ud800"}',
        '{"type":"closing","\\ud800":1}',
        '{"type":"result","outcomes":[{"run_id":"r","attempt":1,"ok":true,"value":NaN}]}',
        '{"type":"result","outcomes":[{"run_id":"r","attempt":1,"ok":true,"value":-Infinity}]}',
        '{"type":"result","outcomes":[{"run_id":"r","attempt":1,"ok":true,"value":[1e400]}]}',
        b"\xff\xfe{}",
        '{"type":"draining"}'.encode("utf-16"),
        '{"type":"draining"}'.encode("utf-32-be"),
        b'\xef\xbb\xbf{"type":"draining"}',  # a BOM, which a text frame does not carry
        '\ufeff{"type":"draining"}',
        b"",
        "",
        " ",
        "{",
        '{"type":"draining"} {}',
        b"\x00",
    ],
    ids=lambda data: repr(data[:24]) + f"..{len(data)}",
)
def test_frames_that_are_not_json_are_invalid_payload(data: bytes | str) -> None:
    assert_error(data, CloseCode.INVALID_PAYLOAD, "not JSON")


def test_surrogate_pairs_are_fine() -> None:
    message = decode('{"type":"closing","reason":"\\ud83d\\ude00"}')
    assert message == Closing(reason="😀")


# Specific errors and their close codes


def test_reasons_stay_short_whatever_the_peer_sent() -> None:
    """A reason goes into a close frame, which holds 123 bytes: peer data is shown briefly."""
    for data in (frame(type="x" * 100_000), heartbeat(seq="y" * 100_000)):
        error = assert_error(data, CloseCode.PROTOCOL_ERROR)
        assert len(error.reason) < 100, error.reason


@pytest.mark.parametrize("data", ["[]", "1", '"hello"', "null", "true", "[{}]", b"[1]"])
def test_frame_must_be_an_object(data: bytes | str) -> None:
    assert_error(data, CloseCode.PROTOCOL_ERROR, "not a JSON object")


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ('{"type":"nope"}', "'nope'"),
        ("{}", "None"),
        ('{"seq":1}', "None"),
        ('{"type":1}', "1"),
        ('{"type":null}', "None"),
        ('{"type":["hello"]}', "['hello']"),
        ('{"type":"Hello"}', "'Hello'"),
        ('{"type":"message"}', "'message'"),
    ],
)
def test_unknown_type(data: str, shown: str) -> None:
    assert_error(data, CloseCode.PROTOCOL_ERROR, f"unknown message type {shown}")


@pytest.mark.parametrize(
    ("data", "where", "expected"),
    [
        (heartbeat(seq="1"), "heartbeat.seq", "an integer"),
        (heartbeat(seq=1.0), "heartbeat.seq", "an integer"),
        (heartbeat(seq=None), "heartbeat.seq", "an integer"),
        (heartbeat(free_slots=[1]), "heartbeat.free_slots", "an integer"),
        (result(ok=1), "result.outcomes[0].ok", "a boolean"),
        (result(ok="true"), "result.outcomes[0].ok", "a boolean"),
        (result(run_id=1), "result.outcomes[0].run_id", "a string"),
        (result(duration_ms="1"), "result.outcomes[0].duration_ms", "a number"),
        (result(duration_ms=False), "result.outcomes[0].duration_ms", "a number"),
        (result(ok=False, error="boom"), "result.outcomes[0].error", "an object"),
        (
            result(ok=False, error={"type": "E", "message": 1}),
            "result.outcomes[0].error.message",
            "a string",
        ),
        (
            frame(type="result", outcomes=[{"run_id": "a", "attempt": 1, "ok": True},
                                           {"run_id": "b", "attempt": 1, "ok": None}]),
            "result.outcomes[1].ok",
            "a boolean",
        ),  # fmt: skip
        (hello(functions={"name": "f"}), "hello.functions", "a list"),
        (hello(functions=["f"]), "hello.functions[0]", "an object"),
        (hello(functions=[{"name": "f"}, {"name": 2}]), "hello.functions[1].name", "a string"),
        (
            hello(functions=[{"name": "f", "options": []}]),
            "hello.functions[0].options",
            "an object",
        ),
        (
            hello(functions=[{"name": "f", "timeout": "1"}]),
            "hello.functions[0].timeout",
            "a number",
        ),
        (
            hello(in_flight=[{"run_id": "r", "attempt": "x"}]),
            "hello.in_flight[0].attempt",
            "an integer",
        ),
        (hello(draining=0), "hello.draining", "a boolean"),
        (frame(type="extend", runs=[[]]), "extend.runs[0]", "an object"),
        (dispatch(args={}), "dispatch.runs[0].args", "a list"),
        (dispatch(kwargs=[]), "dispatch.runs[0].kwargs", "an object"),
        (dispatch(timeout="soon"), "dispatch.runs[0].timeout", "a number"),
    ],
)
def test_wrong_field_type_names_the_field(data: str, where: str, expected: str) -> None:
    error = assert_error(data, CloseCode.PROTOCOL_ERROR)
    assert error.reason.startswith(f"{where} must be {expected}, got "), error.reason


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_integer(value: bool) -> None:
    assert_error(heartbeat(seq=value), CloseCode.PROTOCOL_ERROR, "heartbeat.seq", f"{value}")
    assert_error(
        frame(type="ack", runs=[{"run_id": "r", "attempt": value}]),
        CloseCode.PROTOCOL_ERROR,
        "ack.runs[0].attempt",
    )


def test_integer_fields_are_64_bit() -> None:
    assert decode(heartbeat(seq=2**63 - 1)) == Heartbeat(seq=2**63 - 1, free_slots=2, in_flight=0)
    assert decode(heartbeat(seq=-(2**63))) == Heartbeat(seq=-(2**63), free_slots=2, in_flight=0)
    for big in (2**63, -(2**63) - 1, 10**400):
        assert_error(heartbeat(seq=big), CloseCode.PROTOCOL_ERROR, "heartbeat.seq", "64-bit")
    # a huge integer in a float field is refused too, rather than overflowing float()
    assert_error(
        result(duration_ms=10**400), CloseCode.PROTOCOL_ERROR, "result.outcomes[0].duration_ms"
    )
    # payloads keep arbitrary integers
    assert decode(result(value=[10**400])) == succeeded([10**400])


def test_rejected_value_is_shown_briefly() -> None:
    error = assert_error(heartbeat(seq="x" * 10_000), CloseCode.PROTOCOL_ERROR, "heartbeat.seq")
    assert len(error.reason) < 120
    deep = "[" * 3_000 + "]" * 3_000
    error = assert_error(
        heartbeat().replace('"seq": 1', f'"seq": {deep}'), CloseCode.PROTOCOL_ERROR, "heartbeat.seq"
    )
    assert len(error.reason) < 120


@pytest.mark.parametrize(
    ("data", "where", "name"),
    [
        ('{"type":"heartbeat","seq":1,"free_slots":1}', "heartbeat", "in_flight"),
        ('{"type":"ack","runs":[{"attempt":1}]}', "ack.runs[0]", "run_id"),
        ('{"type":"result_ack"}', "result_ack", "runs"),
        ('{"type":"welcome","session_id":"s"}', "welcome", "heartbeat_interval_ms"),
        (hello(functions=[{"queue": "q"}]), "hello.functions[0]", "name"),
        (frame(type="extend", runs=[{"run_id": "r"}]), "extend.runs[0]", "attempt"),
        (result(ok=False, error={"type": "E"}), "result.outcomes[0].error", "message"),
        ('{"type":"dispatch","lease_ms":1,"runs":[{"run_id":"r","attempt":1}]}',
         "dispatch.runs[0]", "function"),  # fmt: skip
    ],
)
def test_missing_field(data: str, where: str, name: str) -> None:
    assert_error(data, CloseCode.PROTOCOL_ERROR, f"{where}: missing field {name!r}")


def test_oversized_frame_is_message_too_big() -> None:
    message = Ack(runs=(RunRef(run_id="r" * 100, attempt=1),))
    encoded = encode(message)
    assert decode(encoded, max_bytes=len(encoded)) == message
    error = None
    for data in (encoded, encoded.decode()):
        with pytest.raises(ProtocolError) as info:
            decode(data, max_bytes=len(encoded) - 1)
        error = info.value
        assert error.code == CloseCode.MESSAGE_TOO_BIG == 1009
        assert f"{len(encoded)} bytes exceeds {len(encoded) - 1}" in error.reason
    # the size is checked before parsing: garbage that is too big is too big, not invalid
    with pytest.raises(ProtocolError) as info:
        decode(b"\xff" * 11, max_bytes=10)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def acks(n: int) -> list[RunRef]:
    return [RunRef(run_id=f"run-{i:04d}", attempt=1) for i in range(n)]


def make_ack(batch: tuple[RunRef, ...]) -> ResultAck:
    return ResultAck(runs=batch)


def test_a_batch_that_fits_is_one_frame() -> None:
    frames = encode_split(make_ack, acks(50), DEFAULT_MAX_MESSAGE_BYTES)
    assert frames == [encode(ResultAck(runs=tuple(acks(50))))]


@pytest.mark.parametrize("limit", [200, 1_000, 3_000])
def test_a_batch_too_big_for_one_frame_is_split_in_order(limit: int) -> None:
    frames = encode_split(make_ack, acks(100), limit)
    assert len(frames) > 1
    assert all(len(frame) <= limit for frame in frames)
    decoded = [decode(frame, max_bytes=limit) for frame in frames]
    assert [ref for message in decoded for ref in message.runs] == acks(100)  # type: ignore[attr-defined]


def test_an_item_too_big_alone_goes_in_a_frame_of_its_own() -> None:
    big = RunRef(run_id="r" * 500, attempt=1)
    frames = encode_split(make_ack, [*acks(3), big, *acks(2)], 300)
    assert all(len(frame) <= 300 for frame in frames if b"rrrr" not in frame)
    assert [frame for frame in frames if b"rrrr" in frame] == [encode(ResultAck(runs=(big,)))]


def test_text_frame_size_is_counted_in_utf8_bytes() -> None:
    text = encode(Cancel(run_id="😀" * 100, attempt=1)).decode()
    size = len(text.encode())
    assert len(text) < size
    assert decode(text, max_bytes=size) == Cancel(run_id="😀" * 100, attempt=1)
    with pytest.raises(ProtocolError) as info:
        decode(text, max_bytes=size - 1)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


@given(MESSAGES, st.integers(0, 64))
def test_size_limit_is_exact(message: Message, slack: int) -> None:
    encoded = encode(message)
    assert decode(encoded, max_bytes=len(encoded) + slack) == message
    if len(encoded) - 1 - slack >= 0:
        with pytest.raises(ProtocolError) as info:
            decode(encoded.decode(), max_bytes=len(encoded) - 1 - slack)
        assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_default_limit() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    with pytest.raises(ProtocolError) as info:
        decode(b" " * (DEFAULT_MAX_MESSAGE_BYTES + 1))
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


def test_close_codes() -> None:
    assert CloseCode.NORMAL == 1000
    assert CloseCode.PROTOCOL_ERROR == 1002
    assert CloseCode.INVALID_PAYLOAD == 1007
    assert CloseCode.MESSAGE_TOO_BIG == 1009
    assert CloseCode.VERSION_MISMATCH == 4003
    private = [code for code in CloseCode if code >= 4000]
    assert all(4000 <= code <= 4999 for code in private)
    assert len(set(CloseCode)) == len(CloseCode.__members__)  # no aliases


def test_protocol_error_carries_code_and_reason() -> None:
    error = assert_error('{"type":"nope"}', CloseCode.PROTOCOL_ERROR)
    assert str(error) == f"{error.reason} (close code 1002)"
    assert isinstance(error.code, int)


def test_welcome_and_extend_examples() -> None:
    welcome = Welcome(
        session_id="s",
        heartbeat_interval_ms=1000,
        heartbeat_timeout_ms=5000,
        lease_ms=30000,
        extend_interval_ms=10000,
        max_message_bytes=1 << 20,
    )
    assert json.loads(encode(welcome)) == {**dataclasses.asdict(welcome), "type": "welcome"}
    extend = Extend(runs=(RunRef(run_id="a", attempt=1), RunRef(run_id="b", attempt=2)))
    assert json.loads(encode(extend)) == {
        "type": "extend",
        "runs": [{"run_id": "a", "attempt": 1}, {"run_id": "b", "attempt": 2}],
    }
