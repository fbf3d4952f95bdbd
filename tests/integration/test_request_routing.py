"""Custom request routers and model multiplexing, with real replicas, handles and HTTP.

The routers and deployments live in ``request_router_apps`` (config files name them by path).
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import request_router_apps as apps
from request_router_apps import Multiplexed, Scored, Whoami

from shoal import serve
from shoal.serve import api, config_file
from shoal.serve.config import RequestRouterConfig

pytestmark = pytest.mark.timeout(90)


def _tags(serve_instance: Any, app: str) -> set[str]:
    replicas = serve.status().applications[app].deployments["Whoami"].replicas
    return {r.replica_id.rsplit("#", 1)[-1] for r in replicas}


def _loads(log: Path) -> collections.Counter[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return collections.Counter(line.split()[1] for line in lines if line.startswith("load "))


def test_a_custom_router_routes_handle_and_http_calls(serve_instance: Any) -> None:
    config = RequestRouterConfig(request_router_class="request_router_apps:PinnedRouter", request_router_kwargs={"pick": "last"})
    handle = serve.run(Whoami.options(request_router_config=config).bind(), name="pinned", route_prefix="/pinned")
    replies = {handle.remote().result(timeout_s=30) for _ in range(12)}
    url = serve.get_http_url()
    with httpx.Client(timeout=30) as client:
        replies |= {client.get(f"{url}/pinned").text for _ in range(6)}  # the proxy's router too
    tags = _tags(serve_instance, "pinned")
    assert len(tags) == 3
    assert replies == {max(tags)}  # initialize_state got pick="last": all went to one replica
    serve.delete("pinned")


def test_routing_stats_reach_a_custom_router(serve_instance: Any) -> None:
    options = {"request_router_class": apps.HighestStatRouter, "request_routing_stats_period_s": 0.2}
    handle = serve.run(Scored.options(request_router_config=options).bind(), name="scored", route_prefix=None)
    replies = {handle.remote().result(timeout_s=30) for _ in range(8)}
    replicas = serve.status().applications["scored"].deployments["Scored"].replicas
    tags = {r.replica_id.rsplit("#", 1)[-1] for r in replicas}
    assert replies == {max(tags, key=lambda t: int(t, 16))}  # the score record_routing_stats gave
    serve.delete("scored")


def test_a_router_class_in_a_config_file_is_used(serve_instance: Any, tmp_path: Path) -> None:
    path = tmp_path / "pinned.yaml"
    path.write_text(
        "applications:\n"
        "  - name: pinned_file\n"
        "    route_prefix: /pinned_file\n"
        "    import_path: request_router_apps:app\n"
        "    deployments:\n"
        "      - name: Whoami\n"
        "        request_router_config:\n"
        "          request_router_class: request_router_apps:PinnedRouter\n"
        "          request_router_kwargs: {pick: first}\n"
    )
    api.deploy_specs(config_file.build_specs(config_file.load(path)), declarative=False, wait=True)
    handle = serve.get_app_handle("pinned_file")
    replies = {handle.remote().result(timeout_s=30) for _ in range(9)}
    assert replies == {min(_tags(serve_instance, "pinned_file"))}
    serve.delete("pinned_file")


def test_a_router_class_that_does_not_import_is_refused_at_deploy(
    serve_instance: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = Whoami.options(request_router_config={"request_router_class": "request_router_apps:NoSuchRouter"})
    with pytest.raises(ValueError, match="Deployment 'Whoami': request_router_class 'request_router_apps:NoSuchRouter' could not be imported"):
        serve.run(bad.bind(), name="refused")
    path = tmp_path / "bad.yaml"
    path.write_text(
        "applications:\n"
        "  - name: refused_file\n"
        "    import_path: request_router_apps:app\n"
        "    deployments:\n"
        "      - name: Whoami\n"
        "        request_router_config: {request_router_class: no_such_module_zz.Router}\n"
    )
    from shoal import cli

    monkeypatch.setattr(sys, "path", list(sys.path))  # `deploy` puts its --app-dir first
    assert cli.main(["deploy", str(path)]) == 1  # refused before it connects to anything
    assert "Deployment 'Whoami': request_router_class 'no_such_module_zz.Router' could not be imported" in capsys.readouterr().err
    assert not {"refused", "refused_file"} & set(serve.status().applications)


def test_multiplexed_requests_go_where_the_model_is_over_handles_and_http(serve_instance: Any, tmp_path: Path) -> None:
    log = tmp_path / "models.log"
    handle = serve.run(Multiplexed.options(num_replicas=3).bind(str(log)), name="mx", route_prefix="/mx")
    models = [f"m{i}" for i in range(4)]
    holder: dict[str, int] = {}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):  # rounds of concurrent requests, one per model
            results = list(pool.map(lambda m: handle.options(multiplexed_model_id=m).remote().result(timeout_s=30), models))
            for model_id, pid in results:
                holder.setdefault(model_id, pid)
                assert holder[model_id] == pid
    assert sorted(holder) == models
    assert _loads(log) == {m: 1 for m in models}  # each model loaded once, not once per replica
    url = serve.get_http_url()
    with httpx.Client(timeout=30) as client:
        for name in ("serve_multiplexed_model_id", "Serve-Multiplexed-Model-Id", "SERVE-MULTIPLEXED_MODEL-ID"):
            replies = [client.get(f"{url}/mx", headers={name: "m1"}).json() for _ in range(3)]
            assert replies[0][0] == "m1"
            assert {r[1] for r in replies} == {replies[0][1]}  # the proxy learns where m1 is too
    serve.delete("mx")


def test_the_least_recently_used_model_is_unloaded_with_its_del(serve_instance: Any, tmp_path: Path) -> None:
    log = tmp_path / "lru.log"
    handle = serve.run(Multiplexed.bind(str(log)), name="lru", route_prefix=None)  # at most 2 models

    def call(model_id: str) -> None:
        assert handle.options(multiplexed_model_id=model_id).remote().result(timeout_s=30)[0] == model_id

    for model_id in ("a", "b", "a", "c"):  # c evicts b, the least recently used
        call(model_id)
    events = [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()]
    assert events == ["load a", "load b", "del b", "load c"]
    call("b")  # b again evicts a
    assert [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()][4:] == ["del a", "load b"]
    serve.delete("lru")
    wait_for = [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()]
    assert {"del c", "del b"} <= set(wait_for[6:])  # the replica unloaded the rest as it stopped


def test_multiplexing_in_local_testing_mode(tmp_path: Path) -> None:
    log = tmp_path / "local.log"
    handle = serve.run(Multiplexed.bind(str(log)), name="mx_local", _local_testing_mode=True)
    for model_id in ("x", "y", "x", "z"):
        assert handle.options(multiplexed_model_id=model_id).remote().result(timeout_s=30)[0] == model_id
    assert [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()] == ["load x", "load y", "del y", "load z"]
