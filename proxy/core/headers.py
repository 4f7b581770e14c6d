"""Pure header vocabulary: the hop-by-hop and regenerated fields, what Connection nominates, and
the heads the proxy writes itself (framing.py holds the framing rules).

Everything works on raw bytes as the llhttp parser delivers them, so the data plane never decodes
or re-encodes a header it merely forwards.
"""

from __future__ import annotations

from typing import Final

# RFC 9110 §7.6.1: a proxy MUST remove Connection and the fields it nominates, and SHOULD
# remove these well-known hop-by-hop fields. Proxy-Authenticate/-Authorization are for the
# next hop only (§11.7.1, §11.7.2).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Request fields the proxy consumes or regenerates itself rather than copying: framing is
# re-derived (RFC 9112 §6.3), Expect is answered here (RFC 9110 §10.1.1), and the forwarding
# facts are overwritten so a client cannot spoof them (X-Forwarded-For is appended to below).
REQUEST_DROP: Final = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}

RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length"}

# Connection options that name no field (RFC 9112 §9.3, §9.6; RFC 9110 §7.8), and Host, which
# a client may not nominate away (RFC 9110 §7.6.1: senders MUST NOT nominate end-to-end
# fields; the upstream needs Host, RFC 9112 §3.2).
_CONNECTION_OPTIONS: Final = frozenset({b"keep-alive", b"close", b"upgrade", b"host"})

STATUS_REASONS: Final = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def nominated_fields(values: list[bytes]) -> frozenset[bytes]:
    """Lower-cased field names that `Connection` values nominate for removal (RFC 9110 §7.6.1).

    The connection options `keep-alive`, `close` and `upgrade` name no field of their own.
    """
    tokens: set[bytes] = set()
    for value in values:
        for raw in value.split(b","):
            token = raw.strip().lower()
            if token and token not in _CONNECTION_OPTIONS:
                tokens.add(token)
    return frozenset(tokens)


def plain_response(status: int, message: bytes, *, close: bool) -> bytes:
    """A complete proxy-made response: short plain-text body, never a traceback."""
    body = message + b"\n"
    head = status_line(status, b"") + b"Content-Type: text/plain; charset=utf-8\r\n"
    head += b"Content-Length: %d\r\n" % len(body)
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or STATUS_REASONS.get(status, b""))
