"""The upstream side (`proxy.dataplane.upstream`): instance selection (round-robin over a
version's instances, skipping those cooling down), the idle pool, and the response protocol
(`UpstreamConnection`) fed malformed responses as exact bytes on the transport-free harness.
"""

from __future__ import annotations

from collections import Counter

import pytest
from harness import Proxy, one_route_config, responses, status_of

from proxy.core.config import Upstream
from proxy.dataplane.upstream import Instance, UpstreamConnection, VersionPool


def three_instances() -> VersionPool:
    return VersionPool(
        tuple(
            Instance(Upstream(url=f"http://10.0.0.{n}:80", host=f"10.0.0.{n}", port=80))
            for n in (1, 2, 3)
        )
    )


def test_round_robin_visits_every_instance_in_turn() -> None:
    pool = three_instances()
    picks = [pool.pick(now=0.0) for _ in range(6)]
    assert [p.host for p in picks if p] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]


def test_an_instance_in_its_cool_down_is_skipped_and_comes_back_after_it() -> None:
    pool = three_instances()
    pool.instances[1].down_until = 10.0
    during = Counter(p.host for p in (pool.pick(now=5.0) for _ in range(30)) if p)
    assert during == {"10.0.0.1": 15, "10.0.0.3": 15}
    after = Counter(p.host for p in (pool.pick(now=10.0) for _ in range(30)) if p)
    assert after == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}


def test_no_instance_is_offered_when_all_are_cooling_down() -> None:
    pool = three_instances()
    for instance in pool.instances:
        instance.down_until = 3.0
    assert pool.pick(now=2.9) is None
    assert pool.pick(now=3.0) is not None


def test_idle_connections_are_taken_newest_first_and_closed_ones_skipped() -> None:
    pool = three_instances()
    instance = pool.instances[0]

    old, closed, new = (UpstreamConnection(instance) for _ in range(3))
    closed.closed = True
    instance.idle = [old, closed, new]
    assert instance.take_idle() is new
    assert instance.take_idle() is old  # the closed one in between is dropped
    assert instance.take_idle() is None


# -- the response protocol -----------------------------------------------------------------


@pytest.fixture
def proxy() -> Proxy:
    proxy = Proxy(one_route_config())
    proxy.upstream.answer = None  # each test answers by hand
    return proxy


def get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_bytes_after_an_upstream_response_never_reach_the_next_client(proxy: Proxy) -> None:
    first = proxy.converse(get(b"/a"))
    (carrier,) = proxy.upstream.peers
    # A wrong Content-Length: a second, injected response follows in the same write.
    carrier.send(ok(b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nSECRET-FOR-")
    [(status, _, body)], rest = responses(first.received)
    assert (status, body, rest) == (200, b"ok", b""), first.received
    assert carrier.closed, "the connection that carried extra bytes was kept"

    second = proxy.converse(get(b"/b"))
    assert proxy.upstream.connections == 2, "the next request did not get a fresh connection"
    proxy.upstream.peers[1].send(ok(b"conn1 /b"))
    assert b"SECRET" not in second.received
    assert second.received.startswith(b"HTTP/1.1 200 ")
    assert second.received.endswith(b"\r\n\r\nconn1 /b")  # whole, from the fresh connection
    assert carrier.received.startswith(b"GET /a HTTP/1.1\r\n")
    assert carrier.received.count(b" HTTP/1.1\r\n") == 1  # it carried /a and nothing else


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 abc Nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ],
    ids=["not-http", "bad-status", "content-length-and-chunked", "two-content-lengths"],
)
def test_a_malformed_upstream_response_gets_502(proxy: Proxy, answer: bytes) -> None:
    client = proxy.converse(get(b"/"))
    (peer,) = proxy.upstream.peers
    peer.send(answer)
    assert status_of(client.received) == 502, client.received
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "protocol"): 1}
    assert peer.closed, "the proxy kept a connection whose framing it cannot trust"
