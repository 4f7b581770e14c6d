"""Reloads are all or nothing: refused changes leave the file, the runtime and the counters
as a failed reload should."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.control.holder import RuntimeHolder
from proxy.control.loader import load_config_file
from proxy.control.reloads import Reloader
from proxy.core.config import ConfigError

CONFIG = """\
listen: "127.0.0.1:0"
state_dir: {state_dir}
routes:
  - name: shop
    stable: {{upstreams: ["http://{host}:9001"]}}
"""


def setup(tmp_path: Path) -> tuple[Reloader, Path]:
    path = tmp_path / "proxy.yaml"
    path.write_text(CONFIG.format(state_dir="./state", host="127.0.0.1"))
    holder = RuntimeHolder(load_config_file(str(path)))
    return Reloader(holder, str(path)), path


def test_changing_state_dir_is_refused_with_its_path(tmp_path: Path) -> None:
    reloader, path = setup(tmp_path)
    before = path.read_text()
    with pytest.raises(ConfigError) as refused:
        reloader.replace_config(
            CONFIG.format(state_dir="./elsewhere", host="127.0.0.1"), "application/yaml"
        )
    assert [(p.path, p.message) for p in refused.value.problems] == [
        ("state_dir", "changing state_dir needs a restart")
    ]
    assert path.read_text() == before
    assert reloader.holder.outcomes.reloads == {"success": 0, "failure": 1}


def test_joining_or_leaving_a_cluster_is_refused_with_its_path(tmp_path: Path) -> None:
    reloader, path = setup(tmp_path)
    before = path.read_text()
    text = 'cluster: {redis: "redis://127.0.0.1:6379", name: edge}\n' + CONFIG.format(
        state_dir="./state", host="127.0.0.1"
    )
    with pytest.raises(ConfigError) as refused:
        reloader.replace_config(text, "application/yaml")
    assert [(p.path, p.message) for p in refused.value.problems] == [
        ("cluster", "changing the cluster needs a restart")
    ]
    assert path.read_text() == before
    assert reloader.holder.current.config.cluster is None


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_changing_the_worker_count_is_refused_with_its_path(tmp_path: Path, workers: str) -> None:
    reloader, path = setup(tmp_path)
    before = path.read_text()
    generation = reloader.holder.current.generation
    text = f"workers: {workers}\n" + CONFIG.format(state_dir="./state", host="localhost")
    with pytest.raises(ConfigError) as refused:
        reloader.replace_config(text, "application/yaml")
    assert [(p.path, p.message) for p in refused.value.problems] == [
        ("workers", "changing the worker count needs a restart")
    ]
    assert path.read_text() == before
    assert reloader.holder.current.generation == generation
    assert reloader.holder.current.config.workers == 1
    assert reloader.holder.outcomes.reloads == {"success": 0, "failure": 1}


def test_writing_out_the_worker_count_already_running_is_no_change(tmp_path: Path) -> None:
    reloader, path = setup(tmp_path)
    text = "workers: 1\n" + CONFIG.format(state_dir="./state", host="localhost")
    reloader.replace_config(text, "application/yaml")
    assert path.read_text() == text
    assert reloader.holder.outcomes.reloads == {"success": 1, "failure": 0}


def test_an_upstream_host_the_runtime_cannot_use_is_refused_before_the_file_changes(
    tmp_path: Path,
) -> None:
    reloader, path = setup(tmp_path)
    before = path.read_text()
    generation = reloader.holder.current.generation
    with pytest.raises(ConfigError) as refused:
        reloader.replace_config(CONFIG.format(state_dir="./state", host="a" * 64), "text/yaml")
    assert refused.value.problems[0].path == "routes[0].stable.upstreams[0]"
    assert path.read_text() == before
    assert reloader.holder.current.generation == generation
    assert reloader.holder.outcomes.reloads["failure"] == 1


def test_a_valid_config_replaces_the_file_with_exactly_what_was_sent(tmp_path: Path) -> None:
    reloader, path = setup(tmp_path)
    text = CONFIG.format(state_dir="./state", host="localhost")
    result = reloader.replace_config(text, "application/yaml")
    assert path.read_text() == text
    assert result.changed == ("shop",)
    assert reloader.holder.outcomes.reloads == {"success": 1, "failure": 0}
