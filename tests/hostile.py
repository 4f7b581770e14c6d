"""Malformed and hostile requests as exact bytes (docs/operations.md, Responses the proxy makes
itself), shared by the harness tests of the client protocol (tests/unit/test_server.py: every
case) and the socket tests (tests/integration/test_malformed.py: a few end to end), and what a
proxy-made reply to one must look like.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

import pytest
from harness import head_fields, responses, status_of

HOST: Final = b"Host: shop.example\r\n"
MAX_HEADER_BYTES: Final = 8192
MAX_URL_BYTES: Final = 2048
MAX_BODY_BYTES: Final = 1024
LIMITS: Final = {
    "max_header_bytes": MAX_HEADER_BYTES,
    "max_url_bytes": MAX_URL_BYTES,
    "max_body_bytes": MAX_BODY_BYTES,
}
TRACEBACK_MARKERS: Final = (b"Traceback", b'File "', b"Error:", b"Exception")
CONTROL: Final = b"GET /control HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"


def check_proxy_made(data: bytes, statuses: Collection[int]) -> int:
    """`data` is one short plain-text proxy response with an expected status that says
    `Connection: close`, and nothing else; returns its status."""
    assert data, "no response at all"
    assert status_of(data) in statuses, f"expected {sorted(statuses)}, got {data!r}"
    found, rest = responses(data)
    assert len(found) == 1, f"expected exactly one response, got {data!r}"
    assert not rest, f"trailing bytes: {data!r}"
    code, head, body = found[0]
    assert len(body) < 200, f"proxy-made body is not short: {body!r}"
    for marker in TRACEBACK_MARKERS:
        assert marker not in data, f"traceback-like text in {data!r}"
    assert b"text/plain" in head_fields(head).get(b"content-type", b"")
    assert head_fields(head).get(b"connection", b"").lower() == b"close", data
    return code


def post(*fields: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST / HTTP/" + version + b"\r\n" + HOST + b"".join(fields) + b"\r\n" + body


def get(target: bytes = b"/", *fields: bytes, version: bytes = b"1.1", host: bool = True) -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/"
        + version
        + b"\r\n"
        + (HOST if host else b"")
        + b"".join(fields)
        + b"\r\n"
    )


CHUNKED = b"Transfer-Encoding: chunked\r\n"
CL4 = b"Content-Length: 4\r\n"
LAST = b"0\r\n\r\n"
BAD_REQUEST = {400}
BAD_CODING = {400, 501}


def case(request: bytes, statuses: Collection[int], case_id: str) -> Any:
    return pytest.param(request, frozenset(statuses), id=case_id)


REJECTED_CASES = [
    # A1: Content-Length and Transfer-Encoding together, both orders.
    case(post(CL4, CHUNKED, body=LAST), BAD_REQUEST, "A1-cl-then-te"),
    case(post(CHUNKED, CL4, body=LAST), BAD_REQUEST, "A1-te-then-cl"),
    # A2: any coding other than a lone final chunked.
    case(
        post(b"Transfer-Encoding: chunked, identity\r\n", body=LAST),
        BAD_CODING,
        "A2-chunked-identity",
    ),
    case(post(b"Transfer-Encoding: xchunked\r\n", body=LAST), BAD_CODING, "A2-xchunked"),
    case(post(b"Transfer-Encoding: gzip\r\n", body=LAST), BAD_CODING, "A2-gzip"),
    case(post(b"Transfer-Encoding: gzip, chunked\r\n", body=LAST), BAD_CODING, "A2-gzip-chunked"),
    case(post(b"Transfer-Encoding: identity\r\n", body=LAST), BAD_CODING, "A2-identity"),
    # A3: TE.TE obfuscation.
    case(post(CHUNKED, CHUNKED, body=LAST), BAD_REQUEST, "A3-duplicate-te"),
    case(
        post(CHUNKED, b"Transfer-Encoding: identity\r\n", body=LAST),
        BAD_CODING,
        "A3-duplicate-te-chunked-identity",
    ),
    case(post(b"Transfer-Encoding : chunked\r\n", body=LAST), BAD_REQUEST, "A3-space-before-colon"),
    case(
        post(CL4, b"Transfer-Encoding:\tchunked\r\n", body=LAST), BAD_REQUEST, "A3-tab-before-value"
    ),
    case(
        post(CL4, b"Transfer-Encoding: chunked\t\r\n", body=LAST), BAD_REQUEST, "A3-tab-after-value"
    ),
    case(post(b"Transfer-Encoding:\x0bchunked\r\n", body=LAST), BAD_REQUEST, "A3-vt-before-value"),
    case(post(b"Transfer-Encoding: chunked\x0b\r\n", body=LAST), BAD_REQUEST, "A3-vt-after-value"),
    case(post(b"Transfer-Encoding\xff: chunked\r\n", body=LAST), BAD_REQUEST, "A3-0xff-in-name"),
    case(post(b"X: y\r\n\tTransfer-Encoding: chunked\r\n", body=LAST), BAD_REQUEST, "A3-obs-fold"),
    case(post(b"X: y\r\tTransfer-Encoding: chunked\r\n", body=LAST), BAD_REQUEST, "A3-bare-cr-tab"),
    # A4: Content-Length that is not exactly one non-negative decimal.
    case(
        post(b"Content-Length: 3\r\nContent-Length: 4\r\n", body=b"abcd"),
        BAD_REQUEST,
        "A4-differing",
    ),
    case(
        post(b"Content-Length: 3\r\nContent-Length: 3\r\n", body=b"abc"),
        BAD_REQUEST,
        "A4-duplicate-same",
    ),
    case(post(b"Content-Length: 3, 3\r\n", body=b"abc"), BAD_REQUEST, "A4-list"),
    case(post(b"Content-Length: +3\r\n", body=b"abc"), BAD_REQUEST, "A4-plus"),
    case(post(b"Content-Length: -1\r\n", body=b"abc"), BAD_REQUEST, "A4-negative"),
    case(post(b"Content-Length: 0x10\r\n", body=b"abc"), BAD_REQUEST, "A4-hex"),
    case(post(b"Content-Length: \r\n", body=b"abc"), BAD_REQUEST, "A4-empty"),
    case(post(b"Content-Length: 1" + b"0" * 23 + b"\r\n", body=b"abc"), {400, 413}, "A4-huge"),
    # A5: Transfer-Encoding on HTTP/1.0.
    case(post(CHUNKED, body=LAST, version=b"1.0"), BAD_REQUEST, "A5-http10-te"),
    # A11: line endings.
    case(b"GET / HTTP/1.1\nHost: shop.example\n\n", BAD_REQUEST, "A11-bare-lf"),
    case(b"GET / HTTP/1.1\r\nHost: shop.example\nX: y\r\n\r\n", BAD_REQUEST, "A11-bare-lf-header"),
    case(b"GET / HTTP/1.1\rHost: shop.example\r\n\r\n", BAD_REQUEST, "A11-bare-cr"),
    case(get(b"/", b"X-A: a\r\n b\r\n"), BAD_REQUEST, "A11-obs-fold"),
    # A12: bad field names and values.
    case(get(b"/", b"X-A: a\x00b\r\n"), BAD_REQUEST, "A12-nul-in-value"),
    case(get(b"/", b"X-A: a\rb\r\n"), BAD_REQUEST, "A12-cr-in-value"),
    case(get(b"/", b"X(A): b\r\n"), BAD_REQUEST, "A12-paren-in-name"),
    case(get(b"/", b": b\r\n"), BAD_REQUEST, "A12-empty-name"),
    case(get(b"/", b"NoColonHere\r\n"), BAD_REQUEST, "A12-no-colon"),
    # B1: Host.
    case(get(b"/", host=False), BAD_REQUEST, "B1-no-host"),
    case(get(b"/", b"Host: other.example\r\n"), BAD_REQUEST, "B1-two-hosts"),
    case(get(b"/", b"Host: shop example\r\n", host=False), BAD_REQUEST, "B1-host-space"),
    case(get(b"/", b"Host: user@shop.example\r\n", host=False), BAD_REQUEST, "B1-host-userinfo"),
    case(get(b"/", b"Host: shop.example/admin\r\n", host=False), BAD_REQUEST, "B1-host-path"),
    case(get(b"/", b"Host: shop\x01example\r\n", host=False), BAD_REQUEST, "B1-host-ctl"),
    # B2: absolute-form must not turn the proxy into an open proxy.
    case(get(b"http://evil.example/"), BAD_REQUEST, "B2-absolute-form"),
    case(
        get(b"http://evil.example/", b"Host: evil.example\r\n", host=False),
        BAD_REQUEST,
        "B2-absolute-form-matching-host",
    ),
    # B3: methods refused outright.
    case(
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", {405}, "B3-connect"
    ),
    case(b"TRACE / HTTP/1.1\r\n" + HOST + b"\r\n", {405}, "B3-trace"),
    # B4: versions.
    case(get(b"/", version=b"2.0"), {505}, "B4-http20"),
    case(get(b"/", version=b"0.9"), {505}, "B4-http09"),
    case(get(b"/", version=b"3.1"), {505}, "B4-http31"),
    # B5-B7: method, fragment, target length.
    case(b"get / HTTP/1.1\r\n" + HOST + b"\r\n", BAD_REQUEST, "B5-lowercase-method"),
    case(get(b"/a#x"), BAD_REQUEST, "B6-fragment"),
    case(get(b"/" + b"a" * (MAX_URL_BYTES + 50)), {414}, "B7-long-target"),
    # C1: header block too large, too many fields.
    case(
        get(b"/", *(b"X-Big-%02d: %s\r\n" % (i, b"v" * 800) for i in range(12))),
        {431},
        "C1-header-block",
    ),
    case(get(b"/", *(b"X-F%03d: v\r\n" % i for i in range(101))), {431}, "C1-101-fields"),
]


# A6: chunk-size abuse, in a body whose head is valid.
CHUNK_CASES = [
    pytest.param(b"0x1\r\nZ\r\n" + LAST, id="A6-0x-prefix"),
    pytest.param(b"+1\r\nZ\r\n" + LAST, id="A6-plus"),
    pytest.param(b"1_0\r\n" + b"Z" * 16 + b"\r\n" + LAST, id="A6-underscore"),
    pytest.param(b"0_2e\r\n" + b"Z" * 46 + b"\r\n" + LAST, id="A6-0_2e"),
    pytest.param(b"1\nZ\r\n" + LAST, id="A6-bare-lf-after-size"),
    pytest.param(b"1;a\nb\r\nZ\r\n" + LAST, id="A6-lf-in-chunk-ext"),
    pytest.param(b"ffffffffffffffffff\r\nZ\r\n" + LAST, id="A6-overflow"),
    pytest.param(b"1\r\nZZ\r\n" + LAST, id="A6-size-data-mismatch"),
]

# A7: pipelined smuggling: a body that one framing reads as a second request.
SMUGGLED = b"GET /admin HTTP/1.1\r\n" + HOST + b"\r\n"
SMUGGLING_CASES = [
    pytest.param(
        post(
            b"Content-Length: %d\r\n" % (len(LAST) + len(SMUGGLED)), CHUNKED, body=LAST + SMUGGLED
        ),
        id="A7-cl-te",
    ),
    pytest.param(
        post(
            CHUNKED,
            b"Content-Length: 4\r\n",
            body=b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n" + LAST,
        ),
        id="A7-te-cl",
    ),
    pytest.param(
        post(b"Transfer-Encoding: xchunked\r\n", b"Content-Length: 5\r\n", body=LAST + SMUGGLED),
        id="A7-xchunked-cl",
    ),
]
