"""Pure request routing: which route a request belongs to and which version serves it.

Implements docs/semantics.md, Route match and Version decision, on plain strings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.core.bucketing import BUCKETS, bucket, in_canary
from proxy.core.config import Route, Split
from proxy.core.vocabulary import VersionName

FORCE_CANARY: Final = "always"
FORCE_STABLE: Final = "never"

# RFC 6265 §5.2: cookie names and values are trimmed of WSP (space and horizontal tab) only.
_WSP: Final = " \t"
_WSP_CHARS: Final = frozenset(_WSP)

# Distinct raw Host values remembered per table. Real traffic carries a handful; the cap keeps
# a client sending random hosts from growing memory (those just skip the cache).
HOST_CACHE_SIZE: Final = 1024

_Entry = tuple[str, Route]  # (path_prefix, route), in config order


def normalize_host(host: str) -> str:
    """A Host header value as routes store it: lower-cased, port and a trailing dot removed.

    IPv6 literals keep their brackets (`[::1]:8080` -> `[::1]`, RFC 3986 §3.2.2); a bare IPv6
    address (invalid in a Host header, but written so in configs) gets them added.
    """
    h = host.lower()
    if h.startswith("["):
        end = h.find("]")
        # An unterminated literal is malformed; left whole it can match no configured host.
        return h if end < 0 else h[: end + 1]
    name, colon, port = h.partition(":")
    if colon and ":" in port:
        return f"[{h}]"
    # `shop.example.com.` is the same fully qualified name; nginx strips the dot too.
    return name[:-1] if name.endswith(".") else name


class RouteTable:
    """The routes of one config, indexed once so `match` is a dict lookup and a short scan.

    The only state that changes is a bounded memo of raw Host values; answers never do.
    """

    __slots__ = ("_any_host", "_by_host", "_seen_hosts", "routes")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        keyed = [
            (None if r.match.host is None else normalize_host(r.match.host), r) for r in routes
        ]
        # Host-less routes match every host, so each host's list interleaves them in config
        # order: first match wins across both kinds without a second scan.
        self._any_host: tuple[_Entry, ...] = tuple(
            (r.match.path_prefix, r) for h, r in keyed if h is None
        )
        self._by_host: dict[str, tuple[_Entry, ...]] = {
            host: tuple((r.match.path_prefix, r) for h, r in keyed if h is None or h == host)
            for host, _ in keyed
            if host is not None
        }
        # Raw Host header -> candidate entries: normalizing costs ~20x a dict hit.
        self._seen_hosts: dict[str, tuple[_Entry, ...]] = {}

    def match(self, host: str, path: str) -> Route | None:
        """The first route whose host (if any) and path prefix match; None means 404.

        `host` is the raw Host header value; `path` is the request path.
        """
        entries = self._any_host
        # Without host routes the Host header cannot matter; skip looking at it.
        if self._by_host:
            seen = self._seen_hosts.get(host)
            entries = self._entries_for(host) if seen is None else seen
        for prefix, route in entries:
            if path.startswith(prefix):
                return route
        return None

    def _entries_for(self, host: str) -> tuple[_Entry, ...]:
        entries = self._by_host.get(normalize_host(host), self._any_host)
        if len(self._seen_hosts) < HOST_CACHE_SIZE:
            self._seen_hosts[host] = entries
        return entries


def choose_version(
    split: Split,
    *,
    weight_bp: int,
    aborted: bool,
    force: str | None,
    sticky_key: str | None,
    rng: Callable[[], float],
) -> VersionName:
    """The version for one request, in docs/semantics.md order: abort, force, sticky, random.

    `weight_bp` is the live weight (from rollout state, not the config) in basis points;
    `rng` returns a float in [0, 1) and is called only when the decision is random. An empty
    sticky key counts as absent: otherwise every request with an empty header would share one
    bucket and move as a block.
    """
    if aborted:
        return "stable"
    if force == FORCE_CANARY:
        return "canary"
    if force == FORCE_STABLE:
        return "stable"
    # Buckets and rng() * BUCKETS both lie in [0, BUCKETS): at the ends the answer is known
    # without hashing or drawing (weight 0 is the common state after a rollback).
    if weight_bp <= 0:
        return "stable"
    if weight_bp >= BUCKETS:
        return "canary"
    if sticky_key:
        return "canary" if in_canary(bucket(split.salt, sticky_key), weight_bp) else "stable"
    return "canary" if rng() * BUCKETS < weight_bp else "stable"


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie:` header; the first occurrence wins.

    Whitespace around names and values is trimmed and one pair of surrounding double quotes
    removed (RFC 6265 §4.1.1 allows a quoted value); pairs without `=` are skipped. Names are
    case-sensitive.
    """
    # Scanning with str.find instead of splitting: browsers send dozens of cookies and we want
    # one, so the cost stays a few C-level searches whatever the header's length.
    find = cookie_header.find
    pos = find(name)
    while pos >= 0:
        # A real match starts a pair (only WSP since the previous ";") and is followed by
        # optional WSP and "="; otherwise it is part of another cookie's name or value.
        eq = pos + len(name)
        while cookie_header[eq : eq + 1] in _WSP_CHARS:  # a set, so "" past the end is not
            eq += 1
        pair_start = cookie_header.rfind(";", 0, pos) + 1
        if cookie_header[eq : eq + 1] == "=" and not cookie_header[pair_start:pos].strip(_WSP):
            end = find(";", eq + 1)
            value = cookie_header[eq + 1 : end if end >= 0 else None].strip(_WSP)
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                return value[1:-1]
            return value
        pos = find(name, pos + 1)
    return None
