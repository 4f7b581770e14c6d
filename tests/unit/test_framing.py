"""Framing rules: request-head checks, the upstream request head, response framing."""

from __future__ import annotations

import itertools

import pytest

from proxy.core import framing
from proxy.core.framing import (
    CLOSE_DELIMITED,
    CONTENT_TOO_LARGE,
    EXPECTATION_FAILED,
    FRAGMENT,
    INVALID_HOST,
    LOOKALIKE,
    LOOKALIKE_EDGES,
    LOOKALIKE_MIN_LENGTH,
    METHOD_NOT_ALLOWED,
    MISSING_HOST,
    NOT_ORIGIN_FORM,
    RECHUNK,
    REFUSE,
    SEND_LENGTH,
    TE_IN_HTTP10,
    TRANSFER_CODING,
    UNTIL_CLOSE,
    UPGRADE_WITH_BODY,
    VERSION_NOT_SUPPORTED,
    Rejection,
    check_expect,
    check_request_head,
    is_chunked,
    is_framing_lookalike,
    is_valid_host,
    response_framing,
    upstream_request_head,
)

# -- request-head checks -------------------------------------------------------------------

GOOD: dict[str, object] = {
    "version": "1.1",
    "method": b"GET",
    "target": b"/a?b=c",
    "host": b"shop.example",
    "hosts": 1,
    "transfer_encoding": None,
    "content_length": None,
    "upgrade": False,
    "max_body": 0,
    "suspects": None,
}


def check(**changes: object) -> Rejection | None:
    facts = {**GOOD, **changes}
    version, method, target = facts.pop("version"), facts.pop("method"), facts.pop("target")
    return check_request_head(version, method, target, **facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        # RFC 9110 §2.5: HTTP/1.x above 1.1 is processed as 1.1; other majors are refused.
        ({"version": "1.0"}, None),
        ({"version": "1.2"}, None),
        ({"version": "1.9"}, None),
        ({"version": "2.0"}, VERSION_NOT_SUPPORTED),
        ({"version": "0.9"}, VERSION_NOT_SUPPORTED),
        ({"version": "3.1"}, VERSION_NOT_SUPPORTED),
        ({"method": b"CONNECT"}, METHOD_NOT_ALLOWED),
        ({"method": b"TRACE"}, METHOD_NOT_ALLOWED),
        ({"target": b"http://evil.example/"}, NOT_ORIGIN_FORM),
        ({"target": b"*"}, NOT_ORIGIN_FORM),
        ({"target": b"*", "method": b"OPTIONS"}, None),
        ({"target": b"/a#frag"}, FRAGMENT),
        ({"hosts": 2}, INVALID_HOST),
        ({"host": b"a b"}, INVALID_HOST),
        ({"host": None, "hosts": 0}, MISSING_HOST),
        ({"host": None, "hosts": 0, "version": "1.0"}, None),
        ({"host": None, "hosts": 0, "version": "1.2"}, MISSING_HOST),
        ({"transfer_encoding": b"chunked"}, None),
        ({"transfer_encoding": b"chunked", "version": "1.0"}, TE_IN_HTTP10),
        ({"transfer_encoding": b"gzip, chunked"}, TRANSFER_CODING),
        ({"transfer_encoding": b"chunked", "upgrade": True}, UPGRADE_WITH_BODY),
        ({"content_length": b"5", "upgrade": True}, UPGRADE_WITH_BODY),
        ({"content_length": b"0", "upgrade": True}, None),
        ({"upgrade": True}, None),
        ({"content_length": b"1025", "max_body": 1024}, CONTENT_TOO_LARGE),
        ({"content_length": b"1024", "max_body": 1024}, None),
        ({"content_length": b"10" + b"0" * 30}, None),  # no limit set
        ({"max_body": 1024}, None),
        ({"suspects": [b"content_length"]}, LOOKALIKE),
        ({"suspects": [b"cache-control-h", b"transfer.encoding"]}, LOOKALIKE),
        ({"suspects": [b"cache-control-h"]}, None),
    ],
)
def test_request_head_rules(changes: dict[str, object], expected: Rejection | None) -> None:
    assert check(**changes) == expected


def test_request_head_rules_report_in_a_fixed_order() -> None:
    faults: list[tuple[dict[str, object], Rejection]] = [
        ({"version": "2.0"}, VERSION_NOT_SUPPORTED),
        ({"method": b"TRACE"}, METHOD_NOT_ALLOWED),
        ({"target": b"http://x/"}, NOT_ORIGIN_FORM),
        ({"suspects": [b"content_length"]}, LOOKALIKE),
        ({"hosts": 2}, INVALID_HOST),
        ({"transfer_encoding": b"gzip"}, TRANSFER_CODING),
    ]
    for index, (_, expected) in enumerate(faults):
        changes = {name: value for fault, _ in faults[index:] for name, value in fault.items()}
        assert check(**changes) == expected


@pytest.mark.parametrize(
    ("codings", "chunked"),
    [
        (b"chunked", True),
        (b"Chunked", True),
        (b"CHUNKED", True),
        (b"chunked ", True),  # RFC 9110 §5.5: trailing whitespace is not part of the value
        (b"chunked\t", True),
        (b" \tchunked \t", True),
        (b"gzip, chunked", False),  # as the proxy joins `gzip` and `chunked` fields
        (b"chunked, chunked", False),
        (b"chunked, gzip", False),
        (b"chunked,", False),
        (b", chunked", False),
        (b"xchunked", False),
        (b"chunked;q=1", False),
        (b"", False),
    ],
)
def test_only_a_lone_chunked_is_a_coding_the_proxy_forwards(codings: bytes, chunked: bool) -> None:
    assert is_chunked(codings) is chunked


LOOKALIKES = [
    b"content_length",
    b"content--length",
    b"content.length",
    b"content~length",
    b"contentlength",
    b"_content-length",
    b"content-length_",
    b"c-o-n-t-e-n-t-l-e-n-g-t-h",
    b"transfer_encoding",
    b"transfer--encoding",
    b"transfer|encoding",
    b"transferencoding",
    b"-transfer-encoding-",
]
NOT_LOOKALIKES = [
    b"content-length",
    b"transfer-encoding",
    b"content-type",
    b"x-content-length",
    b"content-lengths",
    b"content_type",
    b"accept-encoding",
    b"cache-control",
    b"x_forwarded_for",
]


@pytest.mark.parametrize("name", LOOKALIKES)
def test_lookalikes_of_framing_fields(name: bytes) -> None:
    assert is_framing_lookalike(name)


@pytest.mark.parametrize("name", NOT_LOOKALIKES)
def test_names_that_are_not_lookalikes(name: bytes) -> None:
    assert not is_framing_lookalike(name)


def passes_prefilter(name: bytes) -> bool:
    """The per-field loop's filter (server._route_request inlines it)."""
    return (
        len(name) >= LOOKALIKE_MIN_LENGTH
        and name[0] in LOOKALIKE_EDGES
        and name[-1] in LOOKALIKE_EDGES
    )


@pytest.mark.parametrize("name", LOOKALIKES)
def test_the_loops_prefilter_lets_every_lookalike_through(name: bytes) -> None:
    assert passes_prefilter(name)


def test_the_prefilter_lets_every_separator_placement_through() -> None:
    separators = b"!#$%&'*+-.^_`|~"
    for word in (b"content", b"transfer"):
        rest = b"length" if word == b"content" else b"encoding"
        for before, between, after in itertools.product([b"", b"_", b"."], repeat=3):
            name = before + word + between + rest + after
            assert passes_prefilter(name) == is_framing_lookalike(name) or name in (
                b"content-length",
                b"transfer-encoding",
            )
    assert all(byte in LOOKALIKE_EDGES for byte in separators)


@pytest.mark.parametrize(
    "name",
    [b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"content-type",
     b"cache-control", b"if-none-match", b"authorization", b"x-request-id", b"referer"],
)  # fmt: skip
def test_ordinary_names_never_reach_the_lookalike_check(name: bytes) -> None:
    assert not passes_prefilter(name)


@pytest.mark.parametrize(
    "host", [b"shop.example.com", b"shop.example.com:8080", b"127.0.0.1", b"[::1]:80", b""]
)
def test_well_formed_hosts_are_accepted(host: bytes) -> None:
    assert is_valid_host(host)


@pytest.mark.parametrize(
    "host", [b"a b", b"user@host", b"a/b", b"host:port", b"[zz::1]", b"a\tb", b"a?b"]
)
def test_hosts_that_could_smuggle_a_path_or_userinfo_are_rejected(host: bytes) -> None:
    assert not is_valid_host(host)


def test_host_verdicts_are_remembered_within_a_bound() -> None:
    hosts = [b"h%d.example" % n for n in range(3000)]
    assert all(is_valid_host(host) for host in hosts)
    assert all(is_valid_host(host) for host in hosts)  # answered from memory, or again
    assert not is_valid_host(b"a b")
    assert not is_valid_host(b"a b")
    assert len(framing._HOST_VERDICTS) <= 1024


def test_a_long_host_is_judged_but_not_kept() -> None:
    long_valid = b"a" * 300 + b".example"
    long_invalid = b"a b" * 100
    for _ in range(2):
        assert is_valid_host(long_valid)
        assert not is_valid_host(long_invalid)
    assert long_valid not in framing._HOST_VERDICTS
    assert long_invalid not in framing._HOST_VERDICTS
    assert all(len(host) <= framing.HOST_VERDICT_KEY_MAX for host in framing._HOST_VERDICTS)


@pytest.mark.parametrize(
    ("expect", "expected"),
    [(b"100-continue", None), (b"100-Continue", None), (b"200-ok", EXPECTATION_FAILED)],
)
def test_only_100_continue_is_an_expectation(expect: bytes, expected: Rejection | None) -> None:
    assert check_expect(expect) == expected


# -- the upstream request head -------------------------------------------------------------


HEAD_FACTS: dict[str, object] = {
    "connection": None,
    "xff": None,
    "peer": b"10.0.0.1",
    "host": b"shop.example",
    "authority": b"up:8080",
    "chunked": False,
    "content_length": None,
    "upgrade": None,
}
FORWARDING = (
    b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: shop.example\r\n"
    b"Via: 1.1 canary-proxy\r\n"
)


def head(method: bytes = b"GET", **changes: object) -> bytes:
    facts = {**HEAD_FACTS, **changes}
    lines = facts.pop("lines", [])
    return upstream_request_head(method, b"/p?q", lines, **facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "changes", "framing"),
    [
        (b"GET", {}, b""),
        (b"POST", {}, b"Content-Length: 0\r\n"),  # a body method without a body says so
        (b"PUT", {"content_length": b"12"}, b"Content-Length: 12\r\n"),
        (b"POST", {"chunked": True}, b"Transfer-Encoding: chunked\r\n"),
        (b"GET", {"content_length": b"0"}, b"Content-Length: 0\r\n"),
    ],
)
def test_the_upstream_framing_is_re_derived(
    method: bytes, changes: dict[str, object], framing: bytes
) -> None:
    assert (
        head(method, **changes) == method + b" /p?q HTTP/1.1\r\n" + FORWARDING + framing + b"\r\n"
    )


def test_the_end_to_end_fields_come_first_and_forwarding_facts_are_ours() -> None:
    lines = [b"Accept: */*\r\n", b"X-Trace: 1\r\n"]
    assert head(lines=lines, xff=b"6.6.6.6") == (
        b"GET /p?q HTTP/1.1\r\nAccept: */*\r\nX-Trace: 1\r\n"
        b"X-Forwarded-For: 6.6.6.6, 10.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: shop.example\r\nVia: 1.1 canary-proxy\r\n\r\n"
    )


def test_an_empty_x_forwarded_for_is_replaced_by_the_peer() -> None:
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in head(xff=b"")


def test_fields_the_connection_header_nominates_are_dropped() -> None:
    lines = [b"X-Secret: 1\r\n", b"X-Keep: 2\r\n", b"x-other: 3\r\n"]
    got = head(lines=lines, connection=[b"X-Secret", b"keep-alive, X-OTHER"])
    assert b"X-Keep: 2\r\n" in got
    assert b"X-Secret" not in got
    assert b"x-other" not in got


def test_a_connection_header_that_nominates_nothing_keeps_every_field() -> None:
    lines = [b"X-Keep: 2\r\n"]
    assert head(lines=lines, connection=[b"close"]) == head(lines=lines)


def test_a_request_without_host_gets_the_instances_authority() -> None:
    got = head(host=None)
    assert b"Host: up:8080\r\n" in got
    assert b"X-Forwarded-Host" not in got


def test_an_upgrade_is_re_announced() -> None:
    assert head(upgrade=b"websocket").endswith(
        b"Via: 1.1 canary-proxy\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


# -- response framing ----------------------------------------------------------------------


# (status, Content-Length, coding, HEAD request, HTTP/1.1 client) -> flags
RESPONSE_CASES: list[tuple[tuple[int, bytes | None, bytes | None, bool, bool], int]] = [
    ((200, b"5", None, False, True), SEND_LENGTH),
    ((200, None, b"chunked", False, True), RECHUNK),
    ((200, None, b"chunked", False, False), CLOSE_DELIMITED),
    ((200, None, None, False, True), UNTIL_CLOSE | RECHUNK),
    ((200, None, None, False, False), UNTIL_CLOSE | CLOSE_DELIMITED),
    ((200, None, b"gzip, chunked", False, True), REFUSE),
    ((200, None, b"gzip", False, True), REFUSE),
    ((204, b"5", None, False, True), 0),  # RFC 9110 §8.6
    ((304, b"5", None, False, True), SEND_LENGTH),  # the length a GET would get
    ((304, None, None, False, True), 0),
    ((200, b"5", None, True, True), SEND_LENGTH),  # HEAD: the length a GET would get
    ((200, None, b"chunked", True, True), 0),
    ((200, b"5", b"chunked", False, True), RECHUNK),  # chunked wins (RFC 9112 §6.3)
    ((200, b"5", b"chunked", True, True), SEND_LENGTH),
]


@pytest.mark.parametrize(("response", "expected"), RESPONSE_CASES)
def test_response_framing(
    response: tuple[int, bytes | None, bytes | None, bool, bool], expected: int
) -> None:
    status, length, coding, head_request, http11 = response
    got = response_framing(status, length, coding, head_request=head_request, http11=http11)
    assert got == expected
