"""Header rules: what a Connection header nominates, and our replies."""

from __future__ import annotations

from proxy.core.headers import (
    HOP_BY_HOP,
    nominated_fields,
    plain_response,
    status_line,
)


def test_connection_nominates_its_listed_fields_lower_cased() -> None:
    assert nominated_fields([b"X-Foo, x-BAR", b" Baz "]) == {b"x-foo", b"x-bar", b"baz"}


def test_connection_options_name_no_field() -> None:
    assert nominated_fields([b"keep-alive, close, Upgrade"]) == frozenset()


def test_empty_connection_tokens_are_ignored() -> None:
    assert nominated_fields([b" , ,x"]) == {b"x"}


def test_every_rfc_9110_hop_by_hop_field_is_listed() -> None:
    for name in (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding"):
        assert name in HOP_BY_HOP
    assert b"upgrade" in HOP_BY_HOP
    assert b"proxy-authorization" in HOP_BY_HOP


def test_proxy_replies_are_short_plain_text_with_exact_length() -> None:
    response = plain_response(502, b"Bad Gateway", close=True)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Type: text/plain; charset=utf-8" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: close" in head
    assert body == b"Bad Gateway\n"


def test_keep_alive_replies_do_not_announce_close() -> None:
    assert b"Connection: close" not in plain_response(404, b"Not Found", close=False)


def test_status_line_uses_the_standard_reason_unless_given_one() -> None:
    assert status_line(504, b"") == b"HTTP/1.1 504 Gateway Timeout\r\n"
    assert status_line(299, b"") == b"HTTP/1.1 299 \r\n"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"
