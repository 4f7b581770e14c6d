"""The ops artifacts in config/ do what they claim (issue 6, "first contact").

- Every config (`proxy.yaml`, `examples/*.yaml`, the one in `kubernetes.yaml`'s ConfigMap)
  passes `canary-proxy check`; the A/B and blue/green examples route as their comments say,
  switched with the commands their comments give, on a real `canary-proxy run`.
- The Kubernetes manifest fits its own config: ports, probes, token Secret, state volume; and
  that config starts, with the Secret's token, on 0.0.0.0.
- `alerts.yaml` passes `promtool check rules` and its unit tests (`alerts.test.yaml`), and those
  unit tests fail when an alert can no longer fire.
- Every PromQL expression in the dashboard and the alerts is valid, names only metrics, labels
  and label values that a real proxy exposes, and (with a real Prometheus scraping that proxy)
  returns data with the labels its legend uses, while the alerts fire.

promtool and prometheus come from Debian's `prometheus` package, which `.ci/run` installs; the
tests that need them skip only where it is missing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from fakes import HOST, FakeUpstream, eventually, reply
from prometheus_server import PROMETHEUS, running_prometheus
from proxy_process import (
    CANARY_PROXY,
    TOKEN_ENV,
    ProxyProcess,
    open_session,
    run_cli,
    running_proxy,
    scrape,
    values,
    write_config,
)

from proxy.control.loader import load_config_file, parse_config_text
from proxy.core.bucketing import bucket, in_canary
from proxy.core.vocabulary import GUARD_ACTIONS, ROLLBACK_REASONS

ROOT: Final = Path(__file__).resolve().parents[2]
CONFIG: Final = ROOT / "config"
EXAMPLES: Final = CONFIG / "examples"
DASHBOARD: Final = CONFIG / "grafana-dashboard.json"
ALERTS: Final = CONFIG / "alerts.yaml"
ALERT_TESTS: Final = CONFIG / "alerts.test.yaml"
KUBERNETES: Final = CONFIG / "kubernetes.yaml"
KUBERNETES_FLEET: Final = CONFIG / "kubernetes-fleet.yaml"
CONFIG_FILES: Final = (CONFIG / "proxy.yaml", *sorted(EXAMPLES.glob("*.yaml")))

PROMTOOL: Final = shutil.which("promtool")
NEEDS_PROMTOOL: Final = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool (Debian package `prometheus`) is not installed; `.ci/run` installs it, "
    "so CI never skips this",
)
NEEDS_PROMETHEUS: Final = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus (Debian package `prometheus`) is not installed; `.ci/run` installs it, "
    "so CI never skips this",
)

TOKEN: Final = "examples-test-token"
ADMIN_TOKEN_ENV: Final = "CANARY_PROXY_ADMIN_TOKEN"  # what the examples and the CLI use
# Labels Prometheus adds to every scraped series (they are not in the exposition).
TARGET_LABELS: Final = frozenset({"instance", "job"})
# Grafana's variables, as a query sent to Prometheus reads them (`$route` = "All").
GRAFANA_VARIABLES: Final = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${route}": ".*",
    "$route": ".*",
}

Document = dict[str, Any]


# -- configs ------------------------------------------------------------------------------------


def check(path: Path) -> subprocess.CompletedProcess[str]:
    """`canary-proxy check --config PATH`, the real command."""
    return subprocess.run(
        [*CANARY_PROXY, "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_the_three_examples_are_there() -> None:
    names = {path.name for path in EXAMPLES.glob("*.yaml")}
    assert names >= {"ab-test-by-header.yaml", "blue-green.yaml", "ramp-with-guard.yaml"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: str(path.relative_to(CONFIG)))
def test_config_passes_check(path: Path) -> None:
    result = check(path)
    assert (result.returncode, result.stdout.strip()) == (0, "OK"), result.stderr


@pytest.mark.parametrize(
    "path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: str(path.relative_to(CONFIG))
)
def test_example_is_commented_and_keeps_its_state_next_to_itself(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "an example starts with a comment saying what it shows"
    assert f"canary-proxy check --config config/examples/{path.name}" in text
    state_dir = yaml.safe_load(text)["state_dir"]
    assert not Path(state_dir).is_absolute(), state_dir
    assert ".." not in Path(state_dir).parts, state_dir
    assert Path(load_config_file(str(path)).state_dir).is_relative_to(EXAMPLES)


def test_the_ramp_example_ramps_under_a_rollback_guard() -> None:
    config = load_config_file(str(EXAMPLES / "ramp-with-guard.yaml"))
    (route,) = config.routes
    assert route.rollout is not None
    assert route.guard is not None
    assert route.guard.action == "rollback"
    assert route.rollout.steps_bp[-1] == 10_000
    assert route.split.weight_bp == route.rollout.steps_bp[0]
    # The comment's arithmetic: at 50 requests/s the first step sees enough canary requests in
    # one interval to advance.
    first_step_requests = 50 * route.rollout.steps_bp[0] / 10_000 * route.rollout.interval
    assert first_step_requests >= route.guard.min_requests


def example_on_fakes(
    name: str, tmp_path: Path, upstreams: dict[str, dict[str, str]]
) -> tuple[Document, Path]:
    """The example `name` with listeners on port 0, its state in `tmp_path` and its upstreams
    replaced by `upstreams[route][version]` (URLs of fakes); everything else as written."""
    document: Document = yaml.safe_load((EXAMPLES / name).read_text())
    document["listen"] = f"{HOST}:0"
    document["admin"]["listen"] = f"{HOST}:0"
    document["state_dir"] = str(tmp_path / "state")
    document["timeouts"] = {"shutdown": "1s"}
    for route in document["routes"]:
        for version, url in upstreams[route["name"]].items():
            route[version]["upstreams"] = [url]
    return document, write_config(tmp_path, document)


async def version_of(
    session: aiohttp.ClientSession, proxy: ProxyProcess, path: str, headers: dict[str, str]
) -> str:
    """The version (the fake's X-Version tag) that answered one request."""
    async with session.get(proxy.url + path, headers=headers) as response:
        await response.read()
        assert response.status == 200, (path, headers, response.status)
        return response.headers["X-Version"]


async def test_the_ab_test_example_pins_variants_by_header_and_keeps_each_user_on_one(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    document, path = example_on_fakes(
        "ab-test-by-header.yaml",
        tmp_path,
        {"checkout": {"stable": stable.url, "canary": canary.url}, "web": {"stable": stable.url}},
    )
    split = document["routes"][0]["split"]
    force, sticky = split["force"], split["sticky"]
    async with running_proxy(path) as proxy, open_session() as session:
        pinned = {
            value: {
                await version_of(session, proxy, "/checkout/cart", {force["header"]: value})
                for _ in range(5)
            }
            for value in ("always", "never")
        }
        by_cookie = await version_of(
            session, proxy, "/checkout/cart", {"Cookie": f"{force['cookie']}=always"}
        )
        users = [f"user-{n}" for n in range(40)]
        assigned = {
            user: {
                await version_of(session, proxy, f"/checkout/{n}", {sticky["header"]: user})
                for n in range(3)
            }
            for user in users
        }
        by_uid_cookie = await version_of(
            session, proxy, "/checkout/1", {"Cookie": f"{sticky['cookie']}={users[0]}"}
        )
        elsewhere = await version_of(session, proxy, "/", {force["header"]: "always"})

    assert pinned == {"always": {"canary"}, "never": {"stable"}}
    assert by_cookie == "canary"
    # docs/semantics.md: bucket(salt, user) below weight x 100 -> variant B, on every request.
    expected = {
        user: {
            "canary"
            if in_canary(bucket(split["salt"], user), round(split["weight"] * 100))
            else "stable"
        }
        for user in users
    }
    assert assigned == expected
    assert {"stable", "canary"} <= set().union(*assigned.values())  # both variants have users
    assert {by_uid_cookie} == assigned[users[0]]
    assert elsewhere == "stable"  # the catch-all route has no experiment


async def test_the_blue_green_example_switches_with_the_commands_its_comments_give(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    blue, green = stable, canary
    text = (EXAMPLES / "blue-green.yaml").read_text()
    for command in (
        "canary-proxy set-weight shop 100",
        "canary-proxy set-weight shop 0",
        "canary-proxy abort shop",
        "canary-proxy status shop",
    ):
        assert command in text, command
    document, path = example_on_fakes(
        "blue-green.yaml", tmp_path, {"shop": {"stable": blue.url, "canary": green.url}}
    )
    route = document["routes"][0]
    host = {"Host": route["match"]["host"]}
    force = route["split"]["force"]["header"]
    env = {**os.environ, ADMIN_TOKEN_ENV: TOKEN}

    colour = {blue.version: "blue", green.version: "green"}  # the fakes tag their answers

    async def colours(session: aiohttp.ClientSession, proxy: ProxyProcess) -> set[str]:
        return {colour[await version_of(session, proxy, f"/{n}", host)] for n in range(10)}

    async def cli(proxy: ProxyProcess, *args: str) -> None:
        code, out, err = await run_cli(*args, "--admin", proxy.admin_url, env=env)
        assert code == 0, (args, out, err)

    async with running_proxy(path, env=env) as proxy, open_session() as session:
        live_at_start = await colours(session, proxy)
        smoke_test = colour[await version_of(session, proxy, "/", {**host, force: "always"})]
        await cli(proxy, "set-weight", "shop", "100")
        after_switch = await colours(session, proxy)
        await cli(proxy, "status", "shop")
        await cli(proxy, "set-weight", "shop", "0")
        after_switch_back = await colours(session, proxy)
        await cli(proxy, "set-weight", "shop", "100")

        # Step 4: green becomes stable in the file. Without a new canary revision the weight
        # set above survives the reload, and 100 % would go to the old blue...
        route["stable"]["upstreams"], route["canary"]["upstreams"] = [green.url], [blue.url]
        write_config(tmp_path, document)
        await reload(session, proxy)
        swapped_same_revision = await colours(session, proxy)
        # ... with a new one the route starts afresh at the file's weight 0: all on green.
        route["canary"]["revision"] = "blue-v43"
        write_config(tmp_path, document)
        await reload(session, proxy)
        swapped_new_revision = await colours(session, proxy)

    assert live_at_start == {"blue"}
    assert smoke_test == "green"
    assert after_switch == {"green"}
    assert after_switch_back == {"blue"}
    assert swapped_same_revision == {"blue"}  # the canary's weight stayed 100 %
    assert swapped_new_revision == {"green"}  # weight 0: everything on stable, now green


async def reload(session: aiohttp.ClientSession, proxy: ProxyProcess) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(proxy.admin_url + "/reload", headers=headers) as response:
        assert response.status == 200, await response.text()


# -- kubernetes.yaml ----------------------------------------------------------------------------


def kubernetes_objects(path: Path = KUBERNETES) -> dict[str, list[Document]]:
    """The manifest's objects by kind."""
    objects: dict[str, list[Document]] = {}
    for document in yaml.safe_load_all(path.read_text()):
        if document is not None:
            objects.setdefault(document["kind"], []).append(document)
    return objects


def one(objects: dict[str, list[Document]], kind: str, name: str | None = None) -> Document:
    matching = [o for o in objects.get(kind, []) if name in (None, o["metadata"]["name"])]
    assert len(matching) == 1, (kind, name, [o["metadata"]["name"] for o in matching])
    return matching[0]


def mounted_volume(pod: Document, container: Document, path: str) -> tuple[Document, Document]:
    """(volumeMount, volume) of the container's mount that holds `path` (the deepest one)."""
    mounts = [m for m in container["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, (path, container["volumeMounts"])
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def container_port(container: Document, port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


@dataclass(frozen=True, slots=True)
class Manifest:
    """The manifest's proxy container and the config file it runs with."""

    objects: dict[str, list[Document]]
    pod: Document
    container: Document
    config_path: str  # the --config argument
    config_text: str  # that file: a key of the ConfigMap mounted at its folder


def manifest() -> Manifest:
    objects = kubernetes_objects()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["run", "--config"], args
    config_path = args[2]
    mount, volume = mounted_volume(pod, container, config_path)
    assert "subPath" not in mount, "a subPath mount never sees an updated ConfigMap"
    assert mount.get("readOnly") is True
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    key = str(Path(config_path).relative_to(mount["mountPath"]))
    return Manifest(objects, pod, container, config_path, config_map["data"][key])


def test_the_kubernetes_config_map_holds_a_config_that_passes_check(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(manifest().config_text)
    result = check(path)
    assert (result.returncode, result.stdout.strip()) == (0, "OK"), result.stderr


def test_the_kubernetes_deployment_fits_its_config() -> None:
    m = manifest()
    config = parse_config_text(m.config_text, base_dir=str(Path(m.config_path).parent))
    objects, pod, container = m.objects, m.pod, m.container
    namespace = one(objects, "Namespace")["metadata"]["name"]
    namespaces = {o["metadata"].get("namespace") for kind in objects.values() for o in kind}
    assert namespaces == {None, namespace}  # None: the Namespace itself
    assert container["image"] == "canary-proxy:latest"

    # The admin listener is off loopback (the kubelet probes the pod IP), so it needs the token:
    # its variable comes from the Secret.
    assert config.admin.listen.host == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    assert config.admin.token_env is not None
    secret_ref = env[config.admin.token_env]["valueFrom"]["secretKeyRef"]
    secret = one(objects, "Secret", secret_ref["name"])
    assert secret_ref["key"] in secret["stringData"]

    # Probes on the admin port; the data port is the config's listener.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert container_port(container, port) == config.admin.listen.port
    container_ports = {p["containerPort"] for p in container["ports"]}
    assert {config.listen.port, config.admin.listen.port} <= container_ports

    # Services select the pod and reach the data and admin ports.
    labels = objects["Deployment"][0]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment"][0]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    reached = set()
    for service in objects["Service"]:
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        reached |= {container_port(container, p["targetPort"]) for p in service["spec"]["ports"]}
    assert reached == {config.listen.port, config.admin.listen.port}

    # State on a PersistentVolumeClaim (it must survive restarts), not on the config's mount.
    mount, volume = mounted_volume(pod, container, config.state_dir)
    assert mount.get("readOnly") is not True
    claim = volume["persistentVolumeClaim"]["claimName"]
    one(objects, "PersistentVolumeClaim", claim)

    # Non-root on a read-only root filesystem.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()

    # SIGTERM: the preStop sleep and the drain fit in the grace period.
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sleep + config.timeouts.shutdown < pod["terminationGracePeriodSeconds"]


def test_the_kubernetes_fleet_runs_three_replicas_that_share_the_redis_it_runs(
    tmp_path: Path,
) -> None:
    objects = kubernetes_objects(KUBERNETES_FLEET)
    replicas = one(objects, "StatefulSet")
    assert replicas["spec"]["replicas"] == 3
    pod = replicas["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", "--config", "/etc/canary-proxy/proxy.yaml"]
    _, volume = mounted_volume(pod, container, "/etc/canary-proxy/proxy.yaml")
    text = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]["proxy.yaml"]
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    result = check(path)
    assert (result.returncode, result.stdout.strip()) == (0, "OK"), result.stderr
    config = parse_config_text(text, base_dir="/etc/canary-proxy")
    assert config.cluster is not None
    assert config.cluster.replica == "auto"  # the pod's host name: stable in a StatefulSet

    # The Redis the config names is the one the manifest runs, with the password it sets.
    host = urlsplit(config.cluster.redis).hostname
    assert host is not None
    service = one(objects, "Service", host.split(".")[0])
    redis = one(objects, "Deployment", "canary-proxy-redis")
    redis_pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    (redis_container,) = redis_pod["spec"]["containers"]
    assert container_port(redis_container, service["spec"]["ports"][0]["targetPort"]) == (
        urlsplit(config.cluster.redis).port
    )
    proxy_env = {e["name"]: e for e in container["env"]}
    redis_env = {e["name"]: e for e in redis_container["env"]}
    assert config.cluster.redis_password_env is not None
    assert (
        proxy_env[config.cluster.redis_password_env]["valueFrom"]
        == redis_env["REDIS_PASSWORD"]["valueFrom"]
    )
    assert "$(REDIS_PASSWORD)" in redis_container["args"]

    # Each replica its own state_dir: a claim per pod.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config.state_dir]
    claims = {c["metadata"]["name"] for c in replicas["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims
    governing = one(objects, "Service", replicas["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


async def test_the_kubernetes_config_serves_its_probes_on_0000_only_with_the_secret_token(
    tmp_path: Path,
) -> None:
    document: Document = yaml.safe_load(manifest().config_text)
    document["listen"] = document["listen"].rsplit(":", 1)[0] + ":0"
    document["admin"]["listen"] = document["admin"]["listen"].rsplit(":", 1)[0] + ":0"
    document["state_dir"] = str(tmp_path / "state")
    document["timeouts"] = {"shutdown": "1s"}
    path = write_config(tmp_path, document)
    token_env = document["admin"]["token_env"]
    without_token = {k: v for k, v in os.environ.items() if k != token_env}

    code, _, err = await run_cli("run", "--config", str(path), env=without_token)
    assert code == 2, err
    assert "refusing to expose an unauthenticated admin API" in err

    async with (
        running_proxy(path, env={**without_token, token_env: TOKEN}) as proxy,
        open_session() as session,
    ):
        assert proxy.admin_host == "0.0.0.0"
        admin = f"http://{HOST}:{proxy.admin_port}"
        statuses = []
        for probe in ("/healthz", "/readyz"):
            async with session.get(admin + probe) as response:
                statuses.append(response.status)
        async with session.post(admin + "/reload") as response:
            statuses.append(response.status)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(admin + "/reload", headers=headers) as response:
            statuses.append(response.status)
    assert statuses == [200, 200, 401, 200]


# -- PromQL: what an expression names -----------------------------------------------------------

# Aggregation operators and keywords: identifiers in PromQL that are not metric names. Function
# names need no list: a function name is always followed by "(", which a metric name never is.
PROMQL_WORDS: Final = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "offset",
        "start",
        "end",
        "inf",
        "nan",
    }
)
_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING: Final = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE: Final = re.compile(r"\[[^\]]*\]")
_OFFSET: Final = re.compile(r"\boffset\s+-?\w+|@\s*[\w.]+(?:\(\))?")
_IDENTIFIER: Final = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_MATCHER: Final = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"#(\d+)"')
_SELECTOR_BLOCK: Final = re.compile(r"\s*\{([^}]*)\}")
_BLOCK: Final = re.compile(r"\{[^}]*\}")


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...]


@dataclass(frozen=True, slots=True)
class Query:
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]  # labels named in by/without/on/ignoring/group_x lists


def parse_promql(expr: str) -> Query:
    """The metric selectors (name and label matchers) and the grouping labels of `expr`.

    Not a PromQL parser (promtool checks the syntax): strings are set aside first, so that
    nothing inside a label value or a Grafana variable reads as a name; then range and offset
    durations and grouping lists go; what is left that looks like an identifier, is not a
    keyword and is not called like a function is a metric name.
    """
    strings: list[str] = []

    def set_aside(match: re.Match[str]) -> str:
        strings.append(match[0][1:-1])
        return f'"#{len(strings) - 1}"'

    text = _STRING.sub(set_aside, expr)
    grouping = frozenset(
        label.strip()
        for match in _GROUPING.finditer(text)
        for label in match[2].split(",")
        if label.strip()
    )
    text = _GROUPING.sub(r"\1", text)
    text = _RANGE.sub("[]", text)
    text = _OFFSET.sub("", text)
    # Label names inside {...} are not metric names: blank them out, keeping every position.
    blanked = _BLOCK.sub(lambda block: "{" + " " * (len(block[0]) - 2) + "}", text)
    selectors = []
    for match in _IDENTIFIER.finditer(blanked):
        name = match[0]
        if name.lower() in PROMQL_WORDS or blanked[match.end() :].lstrip().startswith("("):
            continue
        matchers: tuple[Matcher, ...] = ()
        if block := _SELECTOR_BLOCK.match(text, match.end()):
            matchers = tuple(
                Matcher(label, op, strings[int(index)])
                for label, op, index in _MATCHER.findall(block[1])
            )
        selectors.append(Selector(name, matchers))
    return Query(selectors=tuple(selectors), grouping=grouping)


def test_parse_promql_finds_metrics_labels_and_values_and_nothing_else() -> None:
    query = parse_promql(
        "histogram_quantile(0.99, sum by (route, version, le) (rate(\n"
        '  canary_proxy_request_duration_seconds_bucket{route=~"$route", le!="+Inf"}'
        "[$__rate_interval] offset 5m)))\n"
        '/ on (route) group_left (state) max without (job) (up{job="a,b"} == bool 1) * 1e3'
        " or vector(Inf)"
    )
    assert query.selectors == (
        Selector(
            "canary_proxy_request_duration_seconds_bucket",
            (Matcher("route", "=~", "$route"), Matcher("le", "!=", "+Inf")),
        ),
        Selector("up", (Matcher("job", "=", "a,b"),)),
    )
    assert query.grouping == {"route", "version", "le", "state", "job"}


Exposition = dict[str, dict[str, set[str]]]  # sample name -> label -> values seen


def exposition_of(samples: dict[str, list[tuple[dict[str, str], float]]]) -> Exposition:
    exposition: Exposition = {}
    for name, series in samples.items():
        labels = exposition.setdefault(name, {})
        for have, _ in series:
            for label, value in have.items():
                labels.setdefault(label, set()).add(value)
    return exposition


def problems_in(where: str, expr: str, exposition: Exposition) -> list[str]:
    """What in `expr` a proxy does not expose: metric names, label names, label values."""
    query = parse_promql(expr)
    if not query.selectors:
        return [f"{where}: no metric name found in {expr!r}"]
    problems = []
    labels_in_query = set(TARGET_LABELS)
    for selector in query.selectors:
        labels = exposition.get(selector.metric)
        if labels is None:
            problems.append(f"{where}: {selector.metric} is not exposed")
            continue
        labels_in_query |= labels.keys()
        for matcher in selector.matchers:
            seen = labels.get(matcher.label)
            if seen is None and matcher.label not in TARGET_LABELS:
                problems.append(f"{where}: {selector.metric} has no label {matcher.label}")
            elif seen is None or "$" in matcher.value:
                continue
            elif matcher.op == "=" and matcher.value not in seen:
                problems.append(
                    f"{where}: {selector.metric}{{{matcher.label}}} is never "
                    f"{matcher.value!r} (seen: {sorted(seen)})"
                )
            elif matcher.op == "=~" and not any(re.fullmatch(matcher.value, v) for v in seen):
                problems.append(
                    f"{where}: {selector.metric}{{{matcher.label}=~{matcher.value!r}}} matches "
                    f"none of {sorted(seen)}"
                )
    problems.extend(
        f"{where}: groups by {label}, which none of its metrics has"
        for label in sorted(query.grouping - labels_in_query)
    )
    return problems


def test_problems_in_names_a_typo_in_a_metric_a_label_or_a_value() -> None:
    exposition: Exposition = {
        "canary_proxy_requests_total": {"route": {"shop"}, "version": {"stable"}, "code": {"503"}}
    }
    ok = 'sum by (version) (rate(canary_proxy_requests_total{code=~"5.."}[5m]))'
    assert problems_in("ok", ok, exposition) == []
    assert problems_in("a", "rate(canary_proxy_request_total[5m])", exposition) == [
        "a: canary_proxy_request_total is not exposed"
    ]
    assert problems_in("b", 'canary_proxy_requests_total{status="503"}', exposition) == [
        "b: canary_proxy_requests_total has no label status"
    ]
    assert problems_in("c", 'canary_proxy_requests_total{code=~"5xx"}', exposition) == [
        "c: canary_proxy_requests_total{code=~'5xx'} matches none of ['503']"
    ]
    assert problems_in("d", 'canary_proxy_requests_total{version="blue"}', exposition) == [
        "d: canary_proxy_requests_total{version} is never 'blue' (seen: ['stable'])"
    ]
    assert problems_in("e", "sum by (verison) (canary_proxy_requests_total)", exposition) == [
        "e: groups by verison, which none of its metrics has"
    ]


# -- the dashboard ------------------------------------------------------------------------------


def dashboard() -> Document:
    document: Document = json.loads(DASHBOARD.read_text())
    return document


def panels(document: Document) -> Iterator[Document]:
    """Every panel, including those nested in collapsed rows."""
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True, slots=True)
class Target:
    panel: str
    ref: str
    expr: str
    legend: str

    @property
    def where(self) -> str:
        return f"dashboard panel {self.panel!r} target {self.ref}"


def targets(document: Document) -> list[Target]:
    return [
        Target(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(document)
        for target in panel.get("targets", [])
    ]


def as_promql(expr: str) -> str:
    """A dashboard expression as Grafana sends it to Prometheus (all routes, 1m rate window)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know in {expr!r}"
    return expr


def route_variable(document: Document) -> tuple[str, str]:
    """(metric selector, label) of the `route` variable's label_values() query."""
    (variable,) = [v for v in document["templating"]["list"] if v["name"] == "route"]
    assert variable["type"] == "query"
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)", text)
    assert match is not None, text
    assert match[2] == "route"
    return match[1], match[2]


def test_the_dashboard_is_a_grafana_dashboard_with_the_panels_operators_need() -> None:
    document = dashboard()
    assert 36 <= document["schemaVersion"] <= 41
    assert document["uid"]
    assert document["title"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    assert variables["route"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert variables["route"]["multi"]
    assert variables["route"]["includeAll"]
    route_variable(document)

    shown = [p for p in panels(document) if p["type"] != "row"]
    assert len({p["id"] for p in panels(document)}) == len(list(panels(document)))
    for panel in shown:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]
            assert target["legendFormat"], panel["title"]
    exprs = "\n".join(t.expr for t in targets(document))
    # The panels docs/metrics.md's metrics are for: rate, 5xx share and p99 per version; the
    # canary weight; the rollout state; rollbacks and guard breaches.
    for needed in (
        "rate(canary_proxy_requests_total",
        'code=~"5.."',
        "histogram_quantile(0.99, sum by (route, version, le) "
        "(rate(canary_proxy_request_duration_seconds_bucket",
        "canary_proxy_canary_weight_ratio",
        "canary_proxy_rollout_state",
        "canary_proxy_rollbacks_total",
        "canary_proxy_guard_breaches_total",
    ):
        assert needed in exprs, needed
    for target in targets(document):
        if "route" in parse_promql(target.expr).grouping or "{{route}}" in target.legend:
            assert 'route=~"$route"' in target.expr, target.where


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )


@NEEDS_PROMTOOL
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses every expression of a rules file: each query becomes a recording rule.
    rules = [
        {"record": f"dashboard:query_{n}", "expr": as_promql(target.expr)}
        for n, target in enumerate(targets(dashboard()))
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = check_rules(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# -- the alerts ---------------------------------------------------------------------------------


def alert_rules() -> list[Document]:
    document: Document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert {"CanaryAborted", "CanaryGuardBreachObserved", "CanaryProxyConfigReloadFailed"} <= set(
        names
    )
    assert len(set(names)) == len(names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


@NEEDS_PROMTOOL
def test_promtool_accepts_the_alert_rules() -> None:
    result = check_rules(ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def run_rule_tests(directory: Path) -> subprocess.CompletedProcess[str]:
    """`promtool test rules alerts.test.yaml` in `directory` (its rule_files are relative)."""
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=directory,
        env={**os.environ, "NO_COLOR": "1"},
    )


@NEEDS_PROMTOOL
def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = run_rule_tests(CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_unit_tests_that_see_it_fire_and_stay_quiet() -> None:
    document: Document = yaml.safe_load(ALERT_TESTS.read_text())
    assert document["rule_files"] == [ALERTS.name]
    cases = [case for test in document["tests"] for case in test["alert_rule_test"]]
    for name in (rule["alert"] for rule in alert_rules()):
        outcomes = [bool(c.get("exp_alerts")) for c in cases if c["alertname"] == name]
        assert True in outcomes, f"{name}: no unit test sees it fire"
        assert False in outcomes, f"{name}: no unit test sees it stay quiet"


def mutated_alerts(tmp_path: Path, alert: str, expr: str) -> Path:
    """alerts.yaml and its unit tests copied to `tmp_path`, with `alert`'s expression
    replaced by `expr`."""
    document: Document = yaml.safe_load(ALERTS.read_text())
    mutant = copy.deepcopy(document)
    (rule,) = [r for g in mutant["groups"] for r in g["rules"] if r.get("alert") == alert]
    rule["expr"] = expr
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(mutant, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return tmp_path


@NEEDS_PROMTOOL
@pytest.mark.parametrize("alert", [rule["alert"] for rule in alert_rules()])
def test_the_unit_tests_fail_for_an_alert_that_can_never_fire(alert: str, tmp_path: Path) -> None:
    result = run_rule_tests(mutated_alerts(tmp_path, alert, "vector(1) < 0"))
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}," in result.stdout + result.stderr


OBSERVED: Final = 'canary_proxy_guard_breaches_total{action="observe"}'
# Breach alerts that look plausible and are wrong; the unit tests must catch each.
WRONG_BREACH_ALERTS: Final = {
    # The workaround for counters without zero series: with them it fires on every new route
    # (at 0), and on counts made before Prometheus first saw them.
    "fires on series that are new": (
        f"increase({OBSERVED}[15m]) > 0 or ({OBSERVED} unless {OBSERVED} offset 15m)"
    ),
    "never resolves": f"{OBSERVED} > 0",
    "blind to a proxy restart": f"delta({OBSERVED}[15m]) > 0",
    "fires on breaches acted on": "increase(canary_proxy_guard_breaches_total[15m]) > 0",
}


@NEEDS_PROMTOOL
@pytest.mark.parametrize("expr", WRONG_BREACH_ALERTS.values(), ids=WRONG_BREACH_ALERTS.keys())
def test_the_unit_tests_fail_for_a_wrong_breach_alert(expr: str, tmp_path: Path) -> None:
    result = run_rule_tests(mutated_alerts(tmp_path, "CanaryGuardBreachObserved", expr))
    assert result.returncode != 0, result.stdout
    assert "alertname: CanaryGuardBreachObserved," in result.stdout + result.stderr


# -- a real proxy: the names exist, and a real Prometheus answers -------------------------------


def exercised_config(tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream) -> Path:
    """Route `shop` on /shop (others get 404), half to the canary, an observing guard."""
    route = {
        "name": "shop",
        "match": {"path_prefix": "/shop"},
        "stable": {"upstreams": [stable.url]},
        "canary": {"upstreams": [canary.url], "revision": "v2"},
        "split": {"weight": 50, "force": {"header": "X-Canary"}},
        "guard": {"window": "1m", "min_requests": 5, "max_error_rate": 0.2, "action": "observe"},
    }
    config = {
        "listen": f"{HOST}:0",
        "admin": {"listen": f"{HOST}:0", "token_env": TOKEN_ENV},
        "state_dir": str(tmp_path / "state"),
        "timeouts": {"shutdown": "1s"},
        "routes": [route],
    }
    return write_config(tmp_path, config)


@contextlib.asynccontextmanager
async def exercised_proxy(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream, session: aiohttp.ClientSession
) -> AsyncIterator[ProxyProcess]:
    """A real proxy on which every metric family has samples (see `exercise`)."""
    async with running_proxy(exercised_config(tmp_path, stable, canary), token=TOKEN) as proxy:
        await exercise(proxy, canary, session)
        yield proxy


async def exercise(
    proxy: ProxyProcess, canary: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    """Give every metric family samples: traffic to both versions, canary 5xx, a guard breach
    (observed), an admin abort (a rollback), a request with no route."""
    for force in ("never", "always"):
        for n in range(5):
            async with session.get(
                f"{proxy.url}/shop/{n}", headers={"X-Canary": force}
            ) as response:
                assert response.status == 200
    canary.answer_with(reply(500))
    for n in range(5):
        async with session.get(f"{proxy.url}/shop/{n}", headers={"X-Canary": "always"}) as response:
            assert response.status == 500
    async with session.get(proxy.url + "/nowhere") as response:
        assert response.status == 404

    async def breach_counted() -> bool:
        samples = await scrape(session, proxy.admin_url)
        return values(samples, "canary_proxy_guard_breaches_total", action="observe") == [1]

    await eventually(breach_counted, within=10.0, every=0.1)
    async with session.post(
        proxy.admin_url + "/routes/shop/abort",
        json={"reason": "examples test"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status == 200, await response.text()


async def test_every_metric_label_and_value_the_dashboard_and_alerts_use_is_exposed(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with (
        open_session() as session,
        exercised_proxy(tmp_path, stable, canary, session) as proxy,
    ):
        exposition = exposition_of(await scrape(session, proxy.admin_url))

    document = dashboard()
    problems = [
        problem
        for target in targets(document)
        for problem in problems_in(target.where, target.expr, exposition)
    ]
    selector, label = route_variable(document)
    problems += problems_in("dashboard variable route", selector, exposition)
    for sel in parse_promql(selector).selectors:
        if label not in exposition.get(sel.metric, {}):
            problems.append(f"dashboard variable route: {sel.metric} has no label {label}")
    for rule in alert_rules():
        where = f"alert {rule['alert']}"
        problems += problems_in(where, rule["expr"], exposition)
        selectors = parse_promql(rule["expr"]).selectors
        labels = set(TARGET_LABELS).union(*(exposition.get(s.metric, {}).keys() for s in selectors))
        text = " ".join(rule["annotations"].values())
        for used in re.findall(r"\$labels\.(\w+)", text):
            if used not in labels:
                problems.append(f"{where}: annotations use $labels.{used}, which it never has")
        has_route = all("route" in exposition.get(s.metric, {}) for s in selectors)
        if has_route and "{{ $labels.route }}" not in rule["annotations"]["description"]:
            problems.append(f"{where}: the description does not name the route")
    assert problems == []


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as response:
        document = await response.json()
    assert response.status == 200, document
    assert document["status"] == "success", document
    return document["data"]


@NEEDS_PROMETHEUS
async def test_a_real_prometheus_answers_every_dashboard_query_and_fires_the_alerts(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    document = dashboard()
    answered: dict[str, str] = {}  # target -> what is missing, "" once it is answered
    firing: set[tuple[str, str]] = set()
    async with (
        open_session() as session,
        running_proxy(exercised_config(tmp_path, stable, canary), token=TOKEN) as proxy,
        running_prometheus(
            session, tmp_path, f"{HOST}:{proxy.admin_port}", rule_files=[ALERTS]
        ) as prometheus,
    ):

        async def zeros_scraped() -> bool:
            # As in production, Prometheus scrapes the route's counters before anything
            # happens: at 0, so that increase() sees the first breach.
            found = []
            for name in ("canary_proxy_guard_breaches_total", "canary_proxy_rollbacks_total"):
                result = await api(session, prometheus.url + "/api/v1/query", query=name)
                found += [series["value"][1] for series in result["result"]]
            return found == ["0"] * (len(GUARD_ACTIONS) + len(ROLLBACK_REASONS))

        try:
            await eventually(zeros_scraped, within=20.0, every=0.2)
        except TimeoutError:
            pytest.fail(f"no zero series scraped\nprometheus log:\n{prometheus.log()}")
        await exercise(proxy, canary, session)

        async def all_answered() -> bool:
            for target in targets(document):
                if answered.get(target.where) == "":
                    continue
                query = as_promql(target.expr)
                result = await api(session, prometheus.url + "/api/v1/query", query=query)
                legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.legend))
                if not result["result"]:
                    answered[target.where] = "no data"
                else:
                    lacking = [
                        sorted(legend - series["metric"].keys())
                        for series in result["result"]
                        if not legend <= series["metric"].keys()
                    ]
                    answered[target.where] = f"legend labels missing: {lacking}" if lacking else ""
            return not any(answered.values())

        async def alerts_fire() -> bool:
            data = await api(session, prometheus.url + "/api/v1/alerts")
            firing.clear()
            firing.update(
                (alert["labels"]["alertname"], alert["labels"].get("route", ""))
                for alert in data["alerts"]
                if alert["state"] == "firing"
            )
            return {("CanaryAborted", "shop"), ("CanaryGuardBreachObserved", "shop")} <= firing

        try:
            await eventually(all_answered, within=30.0, every=0.5)
            await eventually(alerts_fire, within=30.0, every=0.5)
        except TimeoutError:
            pytest.fail(
                f"queries: {answered}\nfiring: {firing}\nprometheus log:\n{prometheus.log()}"
            )
        selector, label = route_variable(document)
        routes = await api(
            session, f"{prometheus.url}/api/v1/label/{label}/values", **{"match[]": selector}
        )

    assert not any(answered.values())
    assert routes == ["shop"]
    # The reload never failed: that alert stays quiet.
    assert firing == {("CanaryAborted", "shop"), ("CanaryGuardBreachObserved", "shop")}
