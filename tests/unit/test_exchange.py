"""The exchange (`proxy.dataplane.exchange`) on the transport-free harness: a response it cannot
pass on honestly becomes a 502, one cut short reaches the client cut short, and a reply of its
own to a request whose body it will not read closes the connection."""

from __future__ import annotations

import gzip
from typing import Final

import pytest
from harness import Proxy, head_fields, one_route_config, responses, status_of

ZIPPED: Final = gzip.compress(b"hello world")
GET_CLOSE: Final = b"GET /zipped HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        + b"%x\r\n" % len(ZIPPED)
        + ZIPPED
        + b"\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(ZIPPED)
        + ZIPPED
        + b"\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + ZIPPED,
    ],
    ids=["gzip-chunked", "two-fields", "gzip-close-delimited"],
)
def test_a_response_transfer_coding_other_than_chunked_is_a_502(answer: bytes) -> None:
    proxy = Proxy(one_route_config())
    proxy.upstream.answer = None
    client = proxy.converse(GET_CLOSE)
    (peer,) = proxy.upstream.peers
    peer.send(answer)
    assert status_of(client.received) == 502, client.received
    assert ZIPPED not in client.received
    assert client.ended
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "protocol"): 1}


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_an_upstream_dying_mid_body_gives_the_client_an_incomplete_response(
    answer: bytes,
) -> None:
    proxy = Proxy(one_route_config())
    proxy.upstream.answer = None
    client = proxy.converse(b"GET /item HTTP/1.1\r\nHost: shop.example.com\r\n\r\n")
    (peer,) = proxy.upstream.peers
    peer.send(answer)
    peer.hang_up()

    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if b"content-length: 100000" in head.lower():
        assert len(body) < 100_000
    else:
        assert b"transfer-encoding: chunked" in head.lower()
        assert not body.endswith(b"0\r\n\r\n")  # no last-chunk: the message is incomplete
    assert client.reset, "the client was not told the response is incomplete"


def test_a_local_404_for_a_request_with_an_unread_body_says_connection_close() -> None:
    proxy = Proxy(one_route_config(route={"match": {"host": "shop.example.com"}}))
    client = proxy.converse(
        b"POST /upload HTTP/1.1\r\nHost: other.example.com\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    [(status, head, _)], rest = responses(client.received)
    assert status == 404
    assert head_fields(head).get(b"connection") == b"close"
    assert rest == b"", "bytes after a Connection: close response"
    assert client.ended
    assert proxy.upstream.connections == 0
