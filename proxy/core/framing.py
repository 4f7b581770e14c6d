"""HTTP/1.1 framing rules as pure functions: what a request head must satisfy before anything
of it is forwarded, the head the upstream gets, and how a response is framed for the client.

The data plane's compiled per-field loops only classify fields (byte comparisons) and collect
the few facts these functions decide on, with one call per request or response: the rules live
here, under the unit tests, and stay out of the per-field loop.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.core.headers import nominated_fields

# A rejection: the status the client gets and the short text of the reply.
Rejection = tuple[int, bytes]

MAX_HEADER_FIELDS: Final = 100  # Envoy's and HAProxy's default field cap, each way

BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
REFUSED_METHODS: Final = frozenset({b"CONNECT", b"TRACE"})

VIA: Final = b"Via: 1.1 canary-proxy\r\n"

VERSION_NOT_SUPPORTED: Final = (505, b"HTTP Version Not Supported")
METHOD_NOT_ALLOWED: Final = (405, b"Method Not Allowed")
NOT_ORIGIN_FORM: Final = (400, b"Bad Request: request target must be origin-form")
FRAGMENT: Final = (400, b"Bad Request: fragment in request target")
LOOKALIKE: Final = (400, b"Bad Request: field name like a framing field")
INVALID_HOST: Final = (400, b"Bad Request: invalid Host")
MISSING_HOST: Final = (400, b"Bad Request: missing Host")
TE_IN_HTTP10: Final = (400, b"Bad Request: Transfer-Encoding in HTTP/1.0")
TRANSFER_CODING: Final = (501, b"Not Implemented: transfer coding")
UPGRADE_WITH_BODY: Final = (400, b"Bad Request: upgrade request with a body")
CONTENT_TOO_LARGE: Final = (413, b"Content Too Large")
EXPECTATION_FAILED: Final = (417, b"Expectation Failed")

# RFC 3986 §3.2.2 reg-name / IPv4 / IP-literal, optional port. Anything else in Host is a 400
# (RFC 9112 §3.2), so a Host can never smuggle a path, userinfo or whitespace into routing.
_VALID_HOST: Final = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?"
)

# Look-alikes of the framing fields: names that read as Content-Length or Transfer-Encoding
# once separators are dropped or mapped (CGI and nginx's `underscores_in_headers on` map `_`
# to `-`; other hops fold or drop punctuation). The separators are RFC 9110 §5.6.2's tchar
# symbols, the only non-alphanumeric bytes llhttp lets into a field name.
_SEPARATORS: Final = b"!#$%&'*+-.^_`|~"
_FRAMING_LETTERS: Final = frozenset({b"contentlength", b"transferencoding"})
_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})
# The cheap filter the per-field loop applies first: every look-alike is at least this long,
# and starts and ends with a letter of the framing names' ends or with a separator. A name
# that passes is only a suspect; `check_request_head` decides.
LOOKALIKE_MIN_LENGTH: Final = len(b"contentlength")
LOOKALIKE_EDGES: Final = frozenset(b"ct" + b"hg" + _SEPARATORS)

_OWS: Final = b" \t"


def is_framing_lookalike(lname: bytes) -> bool:
    """A lower-cased field name that is not Content-Length or Transfer-Encoding but reads as
    one with its separators dropped: `content_length`, `content--length`, `transfer.encoding`."""
    return lname not in _FRAMING_NAMES and lname.translate(None, _SEPARATORS) in _FRAMING_LETTERS


# is_valid_host's answers: a client sends the same Host on request after request, and a dict
# lookup is a fraction of a regex match. Bounded: emptied when full.
_HOST_VERDICTS: dict[bytes, bool] = {}
_HOST_VERDICTS_MAX: Final = 1024
# A DNS name (253) with a port: a longer value is judged but not kept, so the cache holds at
# most about a quarter of a megabyte whatever clients send.
HOST_VERDICT_KEY_MAX: Final = 262


def is_valid_host(value: bytes) -> bool:
    valid = _HOST_VERDICTS.get(value)
    if valid is None:
        valid = _VALID_HOST.fullmatch(value) is not None
        if len(value) <= HOST_VERDICT_KEY_MAX:
            if len(_HOST_VERDICTS) >= _HOST_VERDICTS_MAX:
                _HOST_VERDICTS.clear()
            _HOST_VERDICTS[value] = valid
    return valid


def is_chunked(codings: bytes) -> bool:
    """Whether a Transfer-Encoding list (all its fields joined by commas, RFC 9110 §5.3) is
    exactly `chunked`, the one coding the proxy forwards (RFC 9112 §6.1): whitespace around it
    is not part of the value (RFC 9110 §5.5), letter case does not matter, anything else
    (another coding, chunked twice, an empty element) is not it."""
    return codings.strip(_OWS).lower() == b"chunked"


def check_request_head(  # noqa: PLR0917 - positional: called for every request (see below)
    version: str,
    method: bytes,
    target: bytes,
    host: bytes | None,
    hosts: int,
    transfer_encoding: bytes | None,
    content_length: bytes | None,
    upgrade: bool,
    max_body: int,
    suspects: list[bytes] | None,
) -> Rejection | None:
    """The request head's rules, in the order they are reported; None if it may be forwarded.

    `version` is llhttp's `major.minor` (a parser that refuses a version is replaced by one
    lenient about it, so that this decides); `transfer_encoding` is every Transfer-Encoding
    field joined by `, `;
    `content_length` llhttp has checked to be one decimal (one field, no list); `upgrade`
    whether llhttp will hand the connection to a tunnel after this head; `max_body` 0 for no
    limit; `suspects` the field names the loop's look-alike pre-filter caught. The parameters
    are positional because the data plane calls this for every request, and an interpreted
    call with keywords costs more.
    """
    if version != "1.1" and not version.startswith("1."):
        # RFC 9110 §2.5: a higher minor version of HTTP/1 is processed as 1.1; HTTP/0.9 and
        # HTTP/2+ in an HTTP/1 message are not supported.
        return VERSION_NOT_SUPPORTED
    if method in REFUSED_METHODS:
        return METHOD_NOT_ALLOWED
    if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS"):
        # Absolute-form would let the target's authority disagree with Host (RFC 9112 §3.2.2).
        return NOT_ORIGIN_FORM
    if b"#" in target:
        return FRAGMENT
    if suspects is not None and any(is_framing_lookalike(name) for name in suspects):
        return LOOKALIKE
    http11 = version != "1.0"
    if hosts > 1 or (host is not None and not (_HOST_VERDICTS.get(host) or is_valid_host(host))):
        return INVALID_HOST
    if host is None and http11:
        return MISSING_HOST
    if transfer_encoding is not None:
        if not http11:
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
            return TE_IN_HTTP10
        if not is_chunked(transfer_encoding):
            return TRANSFER_CODING
    if upgrade and (transfer_encoding is not None or content_length not in (None, b"0")):
        # llhttp hands everything after an upgrade head to the tunnel, so a body here would be
        # framed one way by us and another by the upstream: refuse it.
        return UPGRADE_WITH_BODY
    if max_body and content_length is not None and int(content_length) > max_body:
        return CONTENT_TOO_LARGE
    return None


def check_expect(expect: bytes) -> Rejection | None:
    """RFC 9110 §10.1.1: `100-continue` is the only expectation; any other gets 417."""
    return None if expect.lower() == b"100-continue" else EXPECTATION_FAILED


def upstream_request_head(  # noqa: PLR0917 - positional, as check_request_head's
    method: bytes,
    target: bytes,
    lines: list[bytes],
    connection: list[bytes] | None,
    xff: bytes | None,
    peer: bytes,
    host: bytes | None,
    authority: bytes,
    chunked: bool,
    content_length: bytes | None,
    upgrade: bytes | None,
) -> bytes:
    """The head sent upstream, always HTTP/1.1 (RFC 9112 §2.3, RFC 9110 §7.6).

    `lines` are the end-to-end fields as `Name: value\\r\\n`, already without the hop-by-hop
    and regenerated ones (headers.REQUEST_DROP); the fields `connection` nominates are dropped
    here too. The forwarding facts are ours (X-Forwarded-For appended to, -Proto and -Host
    overwritten, Via added), an HTTP/1.0 request without Host gets the instance's authority,
    the framing is re-derived (RFC 9112 §6.3), and `upgrade` (the client's Upgrade value, for
    an upgrade we pass on) is re-announced with `Connection: upgrade`.
    """
    if connection is not None and (nominated := nominated_fields(connection)):
        lines = [line for line in lines if line.split(b":", 1)[0].lower() not in nominated]
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
    elif content_length is not None:
        framing = b"Content-Length: " + content_length + b"\r\n"
    elif method in BODY_METHODS:
        framing = b"Content-Length: 0\r\n"
    else:
        framing = b""
    # One formatting operation: this runs for every request.
    return _UPSTREAM_HEAD % (
        method,
        target,
        b"".join(lines),
        xff + b", " + peer if xff else peer,  # as nginx's `$proxy_add_x_forwarded_for`
        b"X-Forwarded-Host: " + host if host is not None else b"Host: " + authority,
        framing,
        b"" if upgrade is None else b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n",
    )


_UPSTREAM_HEAD: Final = (
    b"%b %b HTTP/1.1\r\n%bX-Forwarded-For: %b\r\nX-Forwarded-Proto: http\r\n%b\r\n"
    + VIA
    + b"%b%b\r\n"
)


# How a response is framed towards the client (bit flags), or REFUSE.
REFUSE: Final = -1  # a transfer coding we cannot pass on honestly (RFC 9112 §6.1): a 502
SEND_LENGTH: Final = 1  # write the upstream's Content-Length
RECHUNK: Final = 2  # the body is sent chunked to the client (an HTTP/1.1 client)
CLOSE_DELIMITED: Final = 4  # the body ends when the client connection closes (HTTP/1.0)
UNTIL_CLOSE: Final = 8  # the upstream's body ends when its connection does (RFC 9112 §6.3)


def response_framing(
    status: int,
    content_length: bytes | None,
    coding: bytes | None,
    *,
    head_request: bool,
    http11: bool,
) -> int:
    """Flags for a final response's framing (RFC 9112 §6.3), from the upstream's Content-Length
    and its transfer coding (stripped and lower-cased; fields joined by `, `)."""
    chunked = coding is not None
    if chunked and coding != b"chunked":
        return REFUSE
    no_body = head_request or status == 304
    if status == 204:
        return 0  # RFC 9110 §8.6: no Content-Length in a 204
    if content_length is not None and (no_body or not chunked):
        return SEND_LENGTH
    if no_body:
        return 0
    flags = 0 if chunked else UNTIL_CLOSE
    return flags | (RECHUNK if http11 else CLOSE_DELIMITED)
