"""The runtime holder across reloads: what a swap keeps (live route state, upstream instances,
counters), what it retires, and that the runtime it replaces is left as it was."""

from __future__ import annotations

from proxy.control.holder import RuntimeHolder
from proxy.core.config import Config, Upstream, parse_config
from proxy.dataplane.upstream import Instance, UpstreamConnection

STABLE_A = "http://127.0.0.1:8001"
STABLE_B = "http://127.0.0.1:8003"
CANARY_A = "http://127.0.0.1:8002"


def connection() -> tuple[UpstreamConnection, UpstreamConnection]:
    """A connection without a socket for an instance's idle pool; twice, so each test names
    the view it uses (the pool's entry, and the connection whose `closed` it checks)."""
    owner = Instance(Upstream(url="http://127.0.0.1:9", host="127.0.0.1", port=9))
    conn = UpstreamConnection(owner)
    return conn, conn


def route(
    name: str = "shop",
    weight: float = 10,
    stable: tuple[str, ...] = (STABLE_A,),
    canary: tuple[str, ...] = (CANARY_A,),
    **extra: object,
) -> dict[str, object]:
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "stable": {"upstreams": list(stable)},
        "canary": {"upstreams": list(canary), "revision": "v2"},
        "split": {"weight": weight},
        **extra,
    }


def config(*routes: dict[str, object], idle: str = "60s") -> Config:
    return parse_config(
        {"listen": "127.0.0.1:0", "timeouts": {"idle": idle}, "routes": list(routes)},
        base_dir="/srv/proxy",
    )


# -- live route state --------------------------------------------------------------------------


def act(holder: RuntimeHolder, name: str, verb: str, **arguments: object) -> None:
    holder.controller.act(name, verb, holder.canary_stats(name), **arguments)


def test_a_reload_that_keeps_a_routes_weight_keeps_its_live_state() -> None:
    holder = RuntimeHolder(config(route(weight=10)))
    state = holder.current.routes["shop"].state
    act(holder, "shop", "set_weight", weight_bp=4200)  # moved by the admin API, not the config
    assert state.weight_bp == 4200

    holder.swap(config(route(weight=10, stable=(STABLE_A, STABLE_B)), idle="30s"))

    kept = holder.current.routes["shop"].state
    assert kept is state
    assert (kept.weight_bp, kept.aborted) == (4200, False)


def test_an_abort_survives_a_reload_of_the_same_revision() -> None:
    holder = RuntimeHolder(config(route(weight=10)))
    act(holder, "shop", "abort", reason="test")

    holder.swap(config(route(weight=10), idle="30s"))

    kept = holder.current.routes["shop"].state
    assert kept.aborted
    assert kept.rollout.state == "aborted"


def test_a_reload_that_changes_a_routes_weight_starts_it_from_the_new_weight() -> None:
    holder = RuntimeHolder(config(route(weight=10)))
    act(holder, "shop", "set_weight", weight_bp=4200)

    holder.swap(config(route(weight=20)))

    fresh = holder.current.routes["shop"].state
    assert (fresh.weight_bp, fresh.aborted) == (2000, False)
    assert [view.weight_bp for view in holder.route_views()] == [2000]


def test_a_ramp_keeps_its_step_across_reloads_that_keep_that_step() -> None:
    ramp = {"steps": [5, 50, 100], "interval": "1m"}
    holder = RuntimeHolder(config(route(weight=5, rollout=ramp)))
    state = holder.current.routes["shop"].state
    act(holder, "shop", "promote")  # the ramp advanced to 50 %
    assert state.weight_bp == 5000

    holder.swap(config(route(weight=5, rollout={**ramp, "interval": "2m"})))
    assert holder.current.routes["shop"].state is state
    assert state.weight_bp == 5000

    holder.swap(config(route(weight=10, rollout={**ramp, "steps": [10, 50, 100]})))
    assert holder.current.routes["shop"].state.weight_bp == 5000  # still a step of the ramp


def test_each_route_keeps_or_resets_its_own_state_independently() -> None:
    holder = RuntimeHolder(config(route("shop", 10), route("blog", 10)))
    act(holder, "shop", "set_weight", weight_bp=3000)
    act(holder, "blog", "set_weight", weight_bp=3000)

    holder.swap(config(route("shop", 10), route("blog", 15), route("wiki", 40)))

    routes = holder.current.routes
    assert routes["shop"].state.weight_bp == 3000
    assert routes["blog"].state.weight_bp == 1500
    assert routes["wiki"].state.weight_bp == 4000
    assert set(holder.states) == {"shop", "blog", "wiki"}


def test_an_abort_survives_a_reload_that_drops_the_route_and_one_that_brings_it_back() -> None:
    holder = RuntimeHolder(config(route("shop", 10), route("blog", 10)))
    act(holder, "blog", "abort", reason="test")
    holder.swap(config(route("shop", 10)))
    assert "blog" not in holder.states
    holder.swap(config(route("shop", 10), route("blog", 10)))
    assert holder.current.routes["blog"].state.aborted is True


def test_a_route_never_aborted_comes_back_with_its_state() -> None:
    holder = RuntimeHolder(config(route("shop", 10), route("blog", 10)))
    act(holder, "blog", "set_weight", weight_bp=3000)
    holder.swap(config(route("shop", 10)))
    holder.swap(config(route("shop", 10), route("blog", 10)))
    assert holder.current.routes["blog"].state.weight_bp == 3000


# -- upstream instances ------------------------------------------------------------------------


def test_the_same_upstream_url_keeps_its_instance_with_idle_connections_and_cool_down() -> None:
    holder = RuntimeHolder(config(route(weight=10)))
    instance = holder.instances[STABLE_A]
    fake, conn = connection()
    instance.put_idle(conn, now=1.0)
    instance.down_until = 99.0

    holder.swap(config(route(weight=30, stable=(STABLE_B, STABLE_A))))

    pool = holder.current.routes["shop"].stable
    assert pool.instances[1] is instance
    assert instance.idle == [conn]
    assert not fake.closed
    assert instance.down_until == 99.0
    assert not instance.retired
    assert instance.take_idle() is conn


def test_an_upstream_url_shared_by_two_routes_is_one_instance() -> None:
    holder = RuntimeHolder(config(route("shop"), route("blog", canary=(STABLE_A,))))
    shop = holder.current.routes["shop"].stable.instances[0]
    blog_canary = holder.current.routes["blog"].canary
    assert blog_canary is not None
    assert blog_canary.instances[0] is shop


def test_an_upstream_removed_by_a_reload_is_retired_and_its_idle_connections_closed() -> None:
    holder = RuntimeHolder(config(route(stable=(STABLE_A, STABLE_B))))
    removed = holder.instances[STABLE_B]
    first, first_conn = connection()
    second, second_conn = connection()
    removed.put_idle(first_conn, now=1.0)
    removed.put_idle(second_conn, now=2.0)

    holder.swap(config(route(stable=(STABLE_A,))))

    assert removed.retired
    assert first.closed
    assert second.closed
    assert removed.idle == []
    assert STABLE_B not in holder.instances
    assert removed not in list(holder.all_instances())
    assert not holder.instances[STABLE_A].retired


def test_a_connection_released_to_a_retired_instance_is_closed_not_pooled() -> None:
    holder = RuntimeHolder(config(route(stable=(STABLE_A, STABLE_B))))
    old = holder.current
    removed = holder.instances[STABLE_B]
    holder.swap(config(route(stable=(STABLE_A,))))

    # An exchange that started on the old runtime finishes and releases its connection.
    in_flight, conn = connection()
    old.routes["shop"].stable.instances[1].put_idle(conn, now=5.0)

    assert in_flight.closed
    assert removed.idle == []


def test_an_upstream_removed_and_added_back_gets_a_fresh_instance() -> None:
    holder = RuntimeHolder(config(route(stable=(STABLE_A, STABLE_B))))
    retired = holder.instances[STABLE_B]
    holder.swap(config(route(stable=(STABLE_A,))))
    holder.swap(config(route(stable=(STABLE_A, STABLE_B))))

    revived = holder.instances[STABLE_B]
    assert revived is not retired
    assert not revived.retired
    fake, conn = connection()
    revived.put_idle(conn, now=1.0)
    assert revived.idle == [conn]
    assert not fake.closed


def test_close_idle_closes_the_idle_connections_of_every_current_instance() -> None:
    holder = RuntimeHolder(config(route()))
    fakes = []
    for url in (STABLE_A, CANARY_A):
        fake, conn = connection()
        holder.instances[url].put_idle(conn, now=1.0)
        fakes.append(fake)
    holder.close_idle()
    assert all(fake.closed for fake in fakes)
    assert all(instance.idle == [] for instance in holder.all_instances())


# -- the old runtime ---------------------------------------------------------------------------


def test_a_swap_returns_the_old_runtime_untouched_for_requests_still_in_flight() -> None:
    first_config = config(route("shop", 10), route("blog", 10, stable=(STABLE_B,)))
    holder = RuntimeHolder(first_config)
    old = holder.current
    old_routes = dict(old.routes)
    old_shop_instances = old.routes["shop"].stable.instances
    old_blog_instances = old.routes["blog"].stable.instances

    returned = holder.swap(config(route("shop", 50)))

    assert returned is old
    assert holder.current is not old
    assert old.config is first_config
    assert old.generation == 1
    assert holder.current.generation == 2
    assert old.routes == old_routes  # the removed route is still there for its requests
    assert old.routes["shop"].stable.instances == old_shop_instances
    assert old.routes["blog"].stable.instances == old_blog_instances
    assert old.routes["shop"].route.split.weight_bp == 1000
    # Live route state is one object per route across generations: a rollback decided while
    # an old generation still has requests in flight applies to every generation at once.
    assert old.routes["shop"].state is holder.current.routes["shop"].state
    assert holder.current.routes["shop"].state.weight_bp == 5000
    assert old.table.match("example.com", "/blog/post") is not None
    assert holder.current.table.match("example.com", "/blog/post") is None


def test_the_old_and_new_runtime_count_into_the_same_series() -> None:
    holder = RuntimeHolder(config(route(weight=10)))
    old = holder.current
    holder.swap(config(route(weight=20)))
    new = holder.current.routes["shop"]
    assert new.stable_stats is old.routes["shop"].stable_stats
    assert new.canary_stats is old.routes["shop"].canary_stats


def test_generations_count_up_by_one_per_swap() -> None:
    holder = RuntimeHolder(config(route(weight=10)))
    generations = [holder.current.generation]
    for weight in (20, 30, 40):
        holder.swap(config(route(weight=weight)))
        generations.append(holder.current.generation)
    assert generations == [1, 2, 3, 4]
