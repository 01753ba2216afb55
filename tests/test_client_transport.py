"""The client's own HTTP/1.1 transport against a scripted server on a real loopback socket.

The hub only ever answers with a Content-Length; these are the answers it never gives, as a
proxy or a broken peer might: chunked bodies, bodies read to end of file, lies about lengths,
connections cut mid-answer. Each must end in the answer itself or in HubUnavailable, never in
a truncated answer taken for a whole one, and a kept-alive connection is used again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tether import AsyncClient, Client, HubUnavailable

BODY = b'{"id":"r1","state":"queued"}'


class Scripted:
    """Answers each request it reads with the next scripted reply (raw bytes), then closes the
    connection if the reply says so; counts connections and requests."""

    def __init__(self, replies: list[tuple[bytes, bool]]) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.replies:
                    if not _read_request(conn):
                        break
                    self.requests += 1
                    reply, close = self.replies.pop(0)
                    conn.sendall(reply)
                    if close:
                        break

    def close(self) -> None:
        self.sock.close()


def _read_request(conn: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            while len(body) < int(value):
                body += conn.recv(65536)
    return True


@contextmanager
def scripted(*replies: tuple[bytes, bool]) -> Iterator[Scripted]:
    server = Scripted(list(replies))
    try:
        yield server
    finally:
        server.close()


def answer(body: bytes = BODY, *, head: bytes | None = None) -> bytes:
    head = head if head is not None else b"Content-Length: " + str(len(body)).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head + b"\r\n\r\n" + body


CHUNKED = answer(b"6\r\n" + BODY[:6] + b"\r\n" + hex(len(BODY) - 6)[2:].encode() + b";ext=1\r\n"
                 + BODY[6:] + b"\r\n0\r\n\r\n", head=b"Transfer-Encoding: chunked")  # fmt: skip
TO_EOF = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY


@pytest.mark.parametrize(
    ("reply", "close"),
    [(answer(), False), (CHUNKED, False), (TO_EOF, True)],
    ids=["content-length", "chunked", "read-to-eof"],
)
def test_whole_answers_are_read(reply: bytes, close: bool) -> None:
    with scripted((reply, close)) as server, Client(server.url) as client:
        assert client.run("r1") == {"id": "r1", "state": "queued"}


@pytest.mark.parametrize(
    "reply",
    [
        answer(head=b"Content-Length: twelve"),
        answer(head=b"Content-Length: -5"),
        answer(b"zz\r\n{}\r\n0\r\n\r\n", head=b"Transfer-Encoding: chunked"),
        answer(BODY[:10], head=b"Content-Length: " + str(len(BODY)).encode()),  # cut short
        answer(b"6\r\n" + BODY[:6], head=b"Transfer-Encoding: chunked"),  # cut mid-chunk
    ],
    ids=["length-not-a-number", "negative-length", "bad-chunk-size", "short-body", "short-chunk"],
)
def test_a_broken_answer_is_an_error_not_a_short_answer(reply: bytes) -> None:
    with scripted((reply, True)) as server, Client(server.url) as client:
        with pytest.raises(HubUnavailable):
            client.run("r1")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [answer(head=b"Content-Length: twelve"), answer(BODY[:10], head=b"Content-Length: 99")],
    ids=["length-not-a-number", "short-body"],
)
async def test_a_broken_answer_is_an_error_for_the_async_client_too(reply: bytes) -> None:
    with scripted((reply, True)) as server:
        async with AsyncClient(server.url) as client:
            with pytest.raises(HubUnavailable):
                await client.run("r1")


def test_a_kept_alive_connection_is_used_again() -> None:
    with scripted((answer(), False), (CHUNKED, False), (answer(), False)) as server:
        with Client(server.url) as client:
            for _ in range(3):
                assert client.run("r1")["id"] == "r1"
        assert (server.connections, server.requests) == (1, 3)


def test_a_connection_the_server_closed_is_not_used_again() -> None:
    with scripted((TO_EOF, True), (answer(), False)) as server, Client(server.url) as client:
        assert client.run("r1")["id"] == "r1"
        assert client.run("r1")["id"] == "r1"
        assert (server.connections, server.requests) == (2, 2)
