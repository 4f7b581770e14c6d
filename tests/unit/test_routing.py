"""Route matching and the per-request version decision (docs/semantics.md)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.bucketing import BUCKETS, bucket
from proxy.core.config import Match, Route, Split, Version
from proxy.core.routing import (
    HOST_CACHE_SIZE,
    RouteTable,
    choose_version,
    cookie_value,
    normalize_host,
)

SPLIT = Split(weight_bp=500, salt="shop")
STICKY_KEY = "user-42"
STICKY_BUCKET = bucket("shop", STICKY_KEY)  # the weight at which this key joins the canary

keys = st.text(min_size=1, max_size=32)
weights = st.integers(min_value=0, max_value=BUCKETS)


def _route(name: str, host: str | None = None, prefix: str = "/") -> Route:
    return Route(
        name=name,
        match=Match(host=host, path_prefix=prefix),
        stable=Version(upstreams=()),
        canary=None,
        split=Split(salt=name),
    )


def _no_rng() -> float:
    raise AssertionError("rng must not be called when the decision is not random")


class CountingRng:
    def __init__(self, value: float) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


# --- route matching ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("shop.example.com", "shop.example.com"),
        ("Shop.Example.COM", "shop.example.com"),
        ("shop.example.com:8080", "shop.example.com"),
        ("shop.example.com.", "shop.example.com"),
        ("SHOP.example.com.:443", "shop.example.com"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[FE80::1]:80", "[fe80::1]"),
        ("::1", "[::1]"),
        ("[::1", "[::1"),
        ("", ""),
    ],
)
def test_normalize_host_lowercases_and_strips_the_port_keeping_ipv6_brackets(
    raw: str, expected: str
) -> None:
    assert normalize_host(raw) == expected


def test_the_first_matching_route_wins() -> None:
    broad, narrow = _route("broad", prefix="/"), _route("narrow", prefix="/api")
    assert RouteTable((broad, narrow)).match("x", "/api/users") is broad
    assert RouteTable((narrow, broad)).match("x", "/api/users") is narrow


def test_the_host_matches_case_insensitively_and_ignores_the_port() -> None:
    shop = _route("shop", host="shop.example.com")
    table = RouteTable((shop,))
    assert table.match("Shop.Example.COM:8080", "/") is shop
    assert table.match("shop.example.com", "/") is shop
    assert table.match("shop.example.org", "/") is None


@pytest.mark.parametrize("configured", ["[::1]", "::1"])
@pytest.mark.parametrize("header", ["[::1]:8080", "[::1]"])
def test_an_ipv6_literal_host_matches_with_or_without_port(configured: str, header: str) -> None:
    local = _route("local", host=configured)
    assert RouteTable((local,)).match(header, "/") is local
    assert RouteTable((local,)).match("[::2]:8080", "/") is None


def test_the_path_prefix_must_be_a_prefix_of_the_path() -> None:
    api = _route("api", prefix="/api/")
    table = RouteTable((api,))
    assert table.match("x", "/api/v1") is api
    assert table.match("x", "/api/") is api
    assert table.match("x", "/api") is None
    assert table.match("x", "/static/api/") is None


def test_a_route_without_a_host_matches_any_host_in_config_order() -> None:
    static = _route("static", prefix="/static")
    shop = _route("shop", host="shop.example.com")
    table = RouteTable((static, shop))
    assert table.match("shop.example.com", "/static/app.js") is static
    assert table.match("shop.example.com", "/cart") is shop
    assert table.match("other.example.com", "/static/app.js") is static
    assert table.match("", "/static/app.js") is static


def test_no_matching_route_gives_none() -> None:
    assert RouteTable(()).match("shop.example.com", "/") is None
    table = RouteTable((_route("shop", host="shop.example.com", prefix="/shop"),))
    assert table.match("shop.example.com", "/") is None
    assert table.match("cart.example.com", "/shop") is None


def test_a_flood_of_distinct_hosts_neither_grows_the_table_nor_changes_answers() -> None:
    static = _route("static", prefix="/static")
    shop = _route("shop", host="shop.example.com")
    table = RouteTable((static, shop))
    for i in range(HOST_CACHE_SIZE + 100):
        assert table.match(f"junk-{i}.example.com", "/cart") is None
    assert table.match("SHOP.example.com:8080", "/cart") is shop  # computed, cache is full
    assert table.match("junk-3.example.com", "/static/a") is static  # remembered
    assert table.match("junk-3.example.com", "/cart") is None
    assert len(table._seen_hosts) == HOST_CACHE_SIZE


@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from([None, "a.example", "b.example", "[::1]"]),
            st.sampled_from(["/", "/api", "/api/v2", "/static"]),
        ),
        max_size=8,
    ),
    host=st.sampled_from(["a.example", "A.Example:8080", "b.example.", "[::1]:9", "c.example", ""]),
    path=st.sampled_from(["/", "/api", "/api/v2/x", "/apix", "/static/a", "/other"]),
)
def test_the_indexed_table_agrees_with_a_first_match_linear_scan(
    specs: list[tuple[str | None, str]], host: str, path: str
) -> None:
    routes = tuple(_route(f"r{i}", h, p) for i, (h, p) in enumerate(specs))
    expected = next(
        (
            r
            for r in routes
            if (r.match.host is None or r.match.host == normalize_host(host))
            and path.startswith(r.match.path_prefix)
        ),
        None,
    )
    table = RouteTable(routes)
    assert table.match(host, path) is expected
    assert table.match(host, path) is expected  # and again, from the host memo


# --- version decision -------------------------------------------------------------------


def test_an_aborted_route_sends_nobody_to_canary_not_even_forced_or_sticky_users() -> None:
    for force in ("always", "never", None):
        for key in (STICKY_KEY, None):
            decision = choose_version(
                SPLIT, weight_bp=BUCKETS, aborted=True, force=force, sticky_key=key, rng=_no_rng
            )
            assert decision == "stable"


def test_force_always_beats_a_sticky_key_and_a_zero_weight() -> None:
    decision = choose_version(
        SPLIT, weight_bp=0, aborted=False, force="always", sticky_key=STICKY_KEY, rng=_no_rng
    )
    assert decision == "canary"


def test_force_never_beats_a_sticky_key_that_is_in_the_canary() -> None:
    in_canary_weight = STICKY_BUCKET + 1
    sticky_only = choose_version(
        SPLIT,
        weight_bp=in_canary_weight,
        aborted=False,
        force=None,
        sticky_key=STICKY_KEY,
        rng=_no_rng,
    )
    forced = choose_version(
        SPLIT,
        weight_bp=in_canary_weight,
        aborted=False,
        force="never",
        sticky_key=STICKY_KEY,
        rng=_no_rng,
    )
    assert (sticky_only, forced) == ("canary", "stable")


@pytest.mark.parametrize("force", ["", "Always", "yes", "canary"])
def test_an_unknown_force_value_is_ignored_and_the_sticky_key_decides(force: str) -> None:
    decision = choose_version(
        SPLIT,
        weight_bp=STICKY_BUCKET,
        aborted=False,
        force=force,
        sticky_key=STICKY_KEY,
        rng=_no_rng,
    )
    assert decision == "stable"


def test_the_sticky_key_joins_the_canary_exactly_when_its_bucket_is_below_the_weight() -> None:
    def decide(weight_bp: int) -> str:
        return choose_version(
            SPLIT,
            weight_bp=weight_bp,
            aborted=False,
            force=None,
            sticky_key=STICKY_KEY,
            rng=_no_rng,
        )

    assert decide(STICKY_BUCKET) == "stable"
    assert decide(STICKY_BUCKET + 1) == "canary"


def test_the_sticky_key_beats_the_random_draw() -> None:
    # A draw of 0.0 would send a keyless request to the canary, 0.999 to stable; the key's
    # bucket decides instead and the draw is never taken.
    low_draw, high_draw = CountingRng(0.0), CountingRng(0.999)
    stays = choose_version(
        SPLIT,
        weight_bp=STICKY_BUCKET,
        aborted=False,
        force=None,
        sticky_key=STICKY_KEY,
        rng=low_draw,
    )
    joins = choose_version(
        SPLIT,
        weight_bp=STICKY_BUCKET + 1,
        aborted=False,
        force=None,
        sticky_key=STICKY_KEY,
        rng=high_draw,
    )
    assert (stays, joins) == ("stable", "canary")
    assert low_draw.calls == high_draw.calls == 0


def test_the_sticky_bucket_is_taken_with_the_split_salt() -> None:
    cart = Split(salt="cart")
    cart_bucket = bucket("cart", STICKY_KEY)
    assert cart_bucket != STICKY_BUCKET  # precondition: the salts disagree for this key

    def decide(weight_bp: int) -> str:
        return choose_version(
            cart, weight_bp=weight_bp, aborted=False, force=None, sticky_key=STICKY_KEY, rng=_no_rng
        )

    assert (decide(cart_bucket), decide(cart_bucket + 1)) == ("stable", "canary")


@given(key=keys, w1=weights, w2=weights)
def test_raising_the_weight_never_moves_a_sticky_user_back_to_stable(
    key: str, w1: int, w2: int
) -> None:
    low, high = sorted((w1, w2))

    def decide(weight_bp: int) -> str:
        return choose_version(
            SPLIT, weight_bp=weight_bp, aborted=False, force=None, sticky_key=key, rng=_no_rng
        )

    if decide(low) == "canary":
        assert decide(high) == "canary"


@given(key=keys, new=weights, old=weights)
def test_lowering_the_weight_evicts_a_sticky_user_iff_its_bucket_is_at_or_above_it(
    key: str, new: int, old: int
) -> None:
    new, old = sorted((new, old))

    def decide(weight_bp: int) -> str:
        return choose_version(
            SPLIT, weight_bp=weight_bp, aborted=False, force=None, sticky_key=key, rng=_no_rng
        )

    evicted = decide(old) == "canary" and decide(new) == "stable"
    assert evicted == (new <= bucket(SPLIT.salt, key) < old)


@given(key=st.one_of(st.none(), keys))
def test_weight_zero_never_sends_to_canary_and_full_weight_always_does_without_a_draw(
    key: str | None,
) -> None:
    # At the ends the answer is certain, so even a keyless request must not consume a draw.
    def decide(weight_bp: int) -> str:
        return choose_version(
            SPLIT, weight_bp=weight_bp, aborted=False, force=None, sticky_key=key, rng=_no_rng
        )

    assert decide(0) == "stable"
    assert decide(BUCKETS) == "canary"


@pytest.mark.parametrize(
    ("draw", "expected"), [(0.0, "canary"), (0.0499, "canary"), (0.05, "stable"), (0.999, "stable")]
)
def test_without_a_key_one_draw_decides_with_probability_weight(draw: float, expected: str) -> None:
    rng = CountingRng(draw)
    decision = choose_version(
        SPLIT, weight_bp=500, aborted=False, force=None, sticky_key=None, rng=rng
    )
    assert (decision, rng.calls) == (expected, 1)


def test_an_empty_sticky_key_counts_as_absent_and_the_draw_decides() -> None:
    rng = CountingRng(0.0)
    decision = choose_version(SPLIT, weight_bp=1, aborted=False, force=None, sticky_key="", rng=rng)
    assert (decision, rng.calls) == ("canary", 1)


def test_the_random_share_of_100k_keyless_requests_is_within_half_a_point_of_the_weight() -> None:
    seeded = random.Random(7)  # fixed seed: deterministic share
    decisions = [
        choose_version(
            SPLIT, weight_bp=3_750, aborted=False, force=None, sticky_key=None, rng=seeded.random
        )
        for _ in range(100_000)
    ]
    assert abs(100 * decisions.count("canary") / len(decisions) - 37.5) <= 0.5


# --- cookies and keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("a=1; uid=42", "42", id="second-pair"),
        pytest.param("uid=42", "42", id="only-pair"),
        pytest.param("uid=1; uid=2", "1", id="first-occurrence-wins"),
        pytest.param("  uid \t=  42  ; a=1", "42", id="whitespace-trimmed"),
        pytest.param('uid="42"', "42", id="quotes-removed"),
        pytest.param('uid=" 42 "', " 42 ", id="space-inside-quotes-kept"),
        pytest.param('uid="', '"', id="lone-quote-kept"),
        pytest.param('uid="42', '"42', id="unbalanced-quote-kept"),
        pytest.param("uid=", "", id="empty-value"),
        pytest.param("t=a=b; uid=x=y", "x=y", id="equals-in-value"),
        pytest.param("xuid=1; uidx=2", None, id="name-is-not-a-substring-match"),
        pytest.param("xuid=1; uid=2", "2", id="longer-name-skipped"),
        pytest.param("UID=1", None, id="names-case-sensitive"),
        pytest.param("uid; a=1", None, id="pair-without-equals-skipped"),
        pytest.param("uid;uid=3", "3", id="bare-name-then-pair"),
        pytest.param("a=1;", None, id="trailing-semicolon"),
        pytest.param("", None, id="empty-header"),
    ],
)
def test_cookie_value_reads_one_cookie_from_a_cookie_header(
    header: str, expected: str | None
) -> None:
    assert cookie_value(header, "uid") == expected


def _cookie_value_by_splitting(cookie_header: str, name: str) -> str | None:
    """The obvious RFC 6265 §5.2-style parse, as an oracle for the scanning implementation."""
    for pair in cookie_header.split(";"):
        key, eq, value = pair.partition("=")
        if eq and key.strip(" \t") == name:
            value = value.strip(" \t")
            quoted = len(value) >= 2 and value.startswith('"') and value.endswith('"')
            return value[1:-1] if quoted else value
    return None


@given(
    header=st.text(alphabet='uidx=; \t"1', max_size=40),
    name=st.sampled_from(["uid", "u", "id", "x"]),
)
def test_cookie_value_agrees_with_splitting_the_header_into_pairs(header: str, name: str) -> None:
    assert cookie_value(header, name) == _cookie_value_by_splitting(header, name)
