"""Bodies the API must refuse before reading them: no token, or more than max_body_bytes.

A real uvicorn server and a raw socket client: the client announces a huge body, then sends it
slowly while watching for the answer, and counts what it had to send before the answer came.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest
from live_api import served_api

TOKEN = "hostile-bodies-token"
LIMIT = 64 * 1024
ANNOUNCED = 300 * 1024 * 1024
CHUNK = 16 * 1024
MOST_SENT = 1024 * 1024


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The API on a free port, with a known token and a small body limit."""
    env = {
        "VISIONLOOP_API_TOKEN": TOKEN,
        "VISIONLOOP_MAX_BODY_BYTES": str(LIMIT),
        "VISIONLOOP_DATA_DIR": str(tmp_path_factory.mktemp("bodies")),
    }
    with served_api(env) as port:
        yield "127.0.0.1", port


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send_slowly(
    address: tuple[str, int], head: bytes, chunked: bool, first: bytes = b""
) -> tuple[int, bytes]:
    """Send ``head``, then ``first`` and filler chunks until the server answers; returns the
    body bytes sent and the answer."""
    sent = 0
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head)
        while sent < MOST_SENT * 4:
            readable, _, _ = select.select([sock], [], [], 0.02)
            if readable:
                return sent, sock.recv(65536)
            block = (first if not sent else b"") + b"x" * CHUNK
            try:
                sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block)
            except OSError:  # the server answered and closed: read what it said
                return sent, sock.recv(65536)
            sent += len(block)
        raise AssertionError(f"no answer after {sent} bytes of body")


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("path", ["/api/labeling/webhook", "/api/images", "/api/models/rollback"])
def test_an_unauthenticated_huge_body_is_refused_before_it_is_read(
    api: tuple[str, int], path: str
) -> None:
    head = _head(path, {"Content-Type": "application/json", "Content-Length": str(ANNOUNCED)})
    sent, answer = _send_slowly(api, head, chunked=False)
    assert _status(answer) == 401, answer
    assert b"www-authenticate: Bearer" in answer.lower().replace(b"bearer", b"Bearer")
    assert sent < MOST_SENT, f"{sent} bytes were sent before the 401"


def test_an_announced_body_over_the_limit_is_refused_before_it_is_read(
    api: tuple[str, int],
) -> None:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "Content-Length": str(ANNOUNCED),
    }
    sent, answer = _send_slowly(api, _head("/api/labeling/webhook", headers), chunked=False)
    assert _status(answer) == 413, answer
    assert b'"payload_too_large"' in answer and b"max_body_bytes" in answer
    assert sent < MOST_SENT, f"{sent} bytes were sent before the 413"


MULTIPART_START = (
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)


@pytest.mark.parametrize(
    ("path", "media_type", "first"),
    [
        ("/api/labeling/webhook", "application/json", b'{"action": "'),
        # A multipart file part is spooled to disk by the form parser: the limit bounds it too.
        ("/api/images", "multipart/form-data; boundary=b", MULTIPART_START),
    ],
)
def test_a_chunked_body_over_the_limit_is_cut_off_at_the_limit(
    api: tuple[str, int], path: str, media_type: str, first: bytes
) -> None:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": media_type,
        "Transfer-Encoding": "chunked",
    }
    sent, answer = _send_slowly(api, _head(path, headers), chunked=True, first=first)
    assert _status(answer) == 413, answer
    assert b'"payload_too_large"' in answer
    assert sent < MOST_SENT, f"{sent} bytes were sent before the 413"
