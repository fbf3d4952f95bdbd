"""Replica ranks, GPUs, runtime_env and memory, on a real instance declared with 2 fake GPUs.

The deployments are module-level classes, so a replica imports this module by reference: what
it reads from ``os.environ`` at import time shows the environment was set before the import.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import app_status, kill_all, live_children, wait_until

from shoal import serve
from shoal.serve.exceptions import RayServeException
from shoal.serve.handle import DeploymentHandle

pytestmark = pytest.mark.timeout(90)

IMPORTED_WITH = os.environ.get("SHOAL_PLACEMENT_VAR")  # read when a replica imports this module


@pytest.fixture(scope="module", autouse=True)
def gpu_instance() -> Iterator[None]:
    """A private instance whose replicas may use the fake GPUs "0" and "1"."""
    assert not live_children(), "a previous module left processes behind"
    serve.start(http_options={"port": 0}, gpus=2)
    yield
    serve.shutdown()
    try:
        wait_until(lambda: not live_children(), 15, "no child processes left after serve.shutdown()")
    finally:
        kill_all(live_children())


def answers_from_every_replica(call: Callable[[], dict[str, Any]], replicas: int) -> dict[int, dict[str, Any]]:
    """The latest answer of each of ``replicas`` replicas, by pid (calls until all answered)."""
    seen: dict[int, dict[str, Any]] = {}

    def all_answered() -> bool:
        for _ in range(10):
            answer = call()
            seen[answer["pid"]] = answer
        return len(seen) >= replicas

    wait_until(all_answered, 30, f"answers from {replicas} replicas")
    return seen


# -- replica ranks -----------------------------------------------------------------------------


@serve.deployment(num_replicas=3)
class Ranked:
    def __init__(self) -> None:
        self.told: Any = None

    def reconfigure(self, user_config: Any, rank: Any) -> None:
        self.told = rank.rank

    def __call__(self) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        assert ctx.rank is not None
        return {
            "pid": os.getpid(), "rank": ctx.rank.rank, "node_rank": ctx.rank.node_rank,
            "local_rank": ctx.rank.local_rank, "world_size": ctx.world_size, "told": self.told,
        }


def test_ranks_are_contiguous_and_follow_scaling() -> None:
    handle = serve.run(Ranked.bind(), name="ranks", route_prefix=None)
    answers = answers_from_every_replica(lambda: handle.remote().result(), 3)
    assert sorted(a["rank"] for a in answers.values()) == [0, 1, 2]
    for a in answers.values():
        assert (a["node_rank"], a["local_rank"], a["world_size"], a["told"]) == (0, a["rank"], 3, a["rank"])

    handle = serve.run(Ranked.options(num_replicas=2).bind(), name="ranks", route_prefix=None)  # same pids, one fewer

    def settled() -> bool:
        pids = {r.pid for r in app_status("ranks").deployments["Ranked"].replicas if r.state == "RUNNING"}
        answers = answers_from_every_replica(lambda: handle.remote().result(), 2)
        latest = [a for pid, a in answers.items() if pid in pids]
        return len(latest) == 2 and sorted(a["rank"] for a in latest) == [0, 1] and all(
            a["world_size"] == 2 and a["told"] == a["rank"] and a["local_rank"] == a["rank"] for a in latest
        )

    wait_until(settled, 30, "ranks 0 and 1, world size 2, each told through reconfigure")
    serve.delete("ranks")


# -- GPUs --------------------------------------------------------------------------------------


@serve.deployment
class Devices:
    def __call__(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def visible_devices(handle: DeploymentHandle[Any], replicas: int) -> list[str | None]:
    answers = answers_from_every_replica(lambda: handle.remote().result(), replicas)
    return sorted((a["visible"] for a in answers.values()), key=str)


def test_whole_gpus_are_distinct_and_a_third_replica_waits_until_one_is_free() -> None:
    two = serve.run(Devices.options(num_replicas=2, ray_actor_options={"num_gpus": 1}).bind(), name="two", route_prefix=None)
    assert visible_devices(two, 2) == ["0", "1"]

    outcome: dict[str, Any] = {}

    def deploy_third() -> None:
        try:
            outcome["handle"] = serve.run(
                Devices.options(ray_actor_options={"num_gpus": 1}).bind(), name="third", route_prefix=None
            )
        except BaseException as exc:
            outcome["error"] = exc

    third = threading.Thread(target=deploy_third, daemon=True)
    third.start()

    def waiting_message() -> str:
        app = app_status("third")
        return app.deployments["Devices"].message if app is not None and "Devices" in app.deployments else ""

    message = wait_until(lambda: "waiting for resources" in waiting_message() and waiting_message(), 30)
    assert message == (
        "Deployment Devices has 1 replica waiting for resources: it asks for num_gpus=1 and 0 of 2 GPUs are free."
    )
    serve.delete("two")  # frees both devices
    third.join(60)
    assert not third.is_alive() and "error" not in outcome, outcome
    assert visible_devices(outcome["handle"], 1)[0] in ("0", "1")
    assert waiting_message() == ""
    serve.delete("third")


def test_fractional_gpus_share_a_device_and_zero_gpus_leave_the_variable_alone() -> None:
    shared = serve.run(
        Devices.options(num_replicas=3, ray_actor_options={"num_gpus": 0.5}).bind(), name="shared", route_prefix=None
    )
    assert visible_devices(shared, 3) == ["0", "0", "1"]
    serve.delete("shared")
    none = serve.run(Devices.options(ray_actor_options={"num_gpus": 0}).bind(), name="none", route_prefix=None)
    assert visible_devices(none, 1) == [os.environ.get("CUDA_VISIBLE_DEVICES")]  # inherited, as in Ray 2.60
    serve.delete("none")


def test_more_gpus_per_replica_than_the_machine_has_is_refused() -> None:
    with pytest.raises(RayServeException, match=r"ray_actor_options\['num_gpus'\]=3 asks for more GPUs"):
        serve.run(Devices.options(ray_actor_options={"num_gpus": 3}).bind(), name="greedy", route_prefix=None)
    assert app_status("greedy") is None


# -- runtime_env, memory and the options shoal cannot honour -------------------------------------


@serve.deployment(ray_actor_options={"runtime_env": {"env_vars": {"SHOAL_PLACEMENT_VAR": "from-deployment"}}})
class Environment:
    def __call__(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "imported_with": IMPORTED_WITH, "now": os.environ.get("SHOAL_PLACEMENT_VAR"),
            "app_level": os.environ.get("SHOAL_PLACEMENT_APP_VAR"),
        }


env_app = Environment.bind()


def test_runtime_env_vars_are_set_before_the_module_is_imported() -> None:
    handle = serve.run(Environment.bind(), name="env", route_prefix=None)
    answer = handle.remote().result()
    assert (answer["imported_with"], answer["now"]) == ("from-deployment", "from-deployment")
    assert os.environ.get("SHOAL_PLACEMENT_VAR") is None  # the driver's own environment is untouched
    serve.delete("env")


def test_an_application_runtime_env_from_a_config_file_merges_under_the_deployment_s() -> None:
    from shoal.serve import api, config_file
    from shoal.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": [{
        "name": "env-file", "route_prefix": None, "import_path": "test_placement:env_app",
        "runtime_env": {"env_vars": {"SHOAL_PLACEMENT_VAR": "from-app", "SHOAL_PLACEMENT_APP_VAR": "from-app"}},
    }]})
    api.deploy_specs(config_file.build_specs(schema), declarative=False, wait=True)
    answer = serve.get_app_handle("env-file").remote().result()
    assert (answer["now"], answer["app_level"]) == ("from-deployment", "from-app")
    serve.delete("env-file")


@serve.deployment(ray_actor_options={"memory": 1024**3})
class Hungry:
    def __call__(self, nbytes: int) -> int:
        return len(bytearray(nbytes))


def test_memory_is_a_limit_on_the_replica_process() -> None:
    handle = serve.run(Hungry.bind(), name="hungry", route_prefix=None)
    assert handle.remote(64 * 1024**2).result() == 64 * 1024**2
    with pytest.raises(MemoryError):
        handle.remote(2 * 1024**3).result()
    assert handle.remote(1024).result() == 1024  # it keeps serving
    serve.delete("hungry")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"runtime_env": {"pip": ["requests"]}}, "runtime_env['pip']"),
        ({"resources": {"custom": 1}}, "ray_actor_options['resources']"),
        ({"accelerator_type": "A100"}, "ray_actor_options['accelerator_type']"),
    ],
)
def test_options_shoal_cannot_honour_are_refused_at_deploy(options: dict[str, Any], named: str) -> None:
    with pytest.raises(RayServeException) as info:
        serve.run(Devices.options(ray_actor_options=options).bind(), name="refused", route_prefix=None)
    assert named in str(info.value)
