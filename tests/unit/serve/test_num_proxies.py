"""``http_options.num_proxies``: its default, its validation everywhere it can be given, and
how ``shoal status`` and the log files show several proxies. No process is started."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shoal import cli
from shoal.controller.logfiles import classify
from shoal.controller.status import render_status
from shoal.runtime.logs import proxy_log_file_name
from shoal.serve import config as config_module
from shoal.serve.config import HTTPOptions, default_num_proxies
from shoal.serve.schema import ProxyDetails, ProxyStatus, ServeDeploySchema, ServeStatus

BAD = [0, -1, 1.5, "2", True, None]


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_default_is_one_below_four_cores_else_a_few(monkeypatch: pytest.MonkeyPatch, cores: int, expected: int) -> None:
    monkeypatch.delenv("SHOAL_DEFAULT_NUM_PROXIES", raising=False)
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_num_proxies() == expected
    assert HTTPOptions().num_proxies == expected


def test_an_explicit_number_is_kept() -> None:
    assert HTTPOptions(num_proxies=3).num_proxies == 3
    assert HTTPOptions(num_proxies=3).model_dump()["num_proxies"] == 3


@pytest.mark.parametrize("bad", BAD)
def test_http_options_refuse_a_bad_number_naming_it(bad: Any) -> None:
    with pytest.raises(ValueError, match="num_proxies"):
        HTTPOptions(num_proxies=bad)


@pytest.mark.parametrize("bad", BAD)
def test_a_config_file_refuses_a_bad_number_naming_it(bad: Any) -> None:
    with pytest.raises(ValueError, match="num_proxies"):
        ServeDeploySchema.model_validate({"http_options": {"num_proxies": bad}, "applications": []})


def test_a_config_file_takes_a_number() -> None:
    schema = ServeDeploySchema.model_validate({"http_options": {"num_proxies": 2}, "applications": []})
    assert schema.http_options.num_proxies == 2


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_the_cli_refuses_a_bad_number_naming_it(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli._parser().parse_args(["start", "--num-proxies", bad])
    assert exited.value.code == 2
    assert "num_proxies" in capsys.readouterr().err


def test_the_cli_takes_a_number() -> None:
    assert cli._parser().parse_args(["start", "--num-proxies", "3"]).num_proxies == 3
    assert cli._parser().parse_args(["start"]).num_proxies is None  # unset: the default, or unchanged
    assert cli._parser().parse_args(["run", "app:app", "--num-proxies", "2"]).num_proxies == 2


def test_status_lists_every_proxy_process_and_round_trips() -> None:
    processes = [
        {"index": 0, "pid": 101, "status": "HEALTHY", "restarts": 0},
        {"index": 1, "pid": None, "status": "UNHEALTHY", "restarts": 2},
    ]
    report = render_status([], "HEALTHY", proxies=processes)
    assert report["proxies"] == {"local": "HEALTHY"}
    assert report["proxy_processes"] == processes
    status = ServeStatus.from_dict(report)
    assert status.proxy_processes == [
        ProxyDetails(0, 101, ProxyStatus.HEALTHY, 0), ProxyDetails(1, None, ProxyStatus.UNHEALTHY, 2),
    ]
    assert status.to_dict()["proxy_processes"] == processes


def test_shoal_status_shows_pids_and_states() -> None:
    app = {"status": "RUNNING", "message": "", "deployments": {}, "route_prefix": "/"}
    shown = cli.format_status({
        "proxies": {"local": "HEALTHY"}, "applications": {"a": app}, "target_capacity": None,
        "proxy_processes": [
            {"index": 0, "pid": 101, "status": "HEALTHY", "restarts": 0},
            {"index": 1, "pid": None, "status": "UNHEALTHY", "restarts": 2},
        ],
    })
    assert shown.splitlines()[0] == "proxy: local HEALTHY (2 processes: pid 101 HEALTHY, pid - UNHEALTHY (2 restarts))"


def test_each_proxy_has_its_own_log_file_which_shoal_logs_proxy_reads(tmp_path: Path) -> None:
    assert proxy_log_file_name("127.0.0.1") == "proxy_127.0.0.1.log"  # Ray's name, for the first
    assert proxy_log_file_name("127.0.0.1", 2) == "proxy_127.0.0.1_2.log"
    for name in ("proxy_127.0.0.1.log", "proxy_127.0.0.1_2.log"):
        assert classify(tmp_path / name).is_proxy


def test_the_environment_can_replace_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_DEFAULT_NUM_PROXIES", "3")
    assert HTTPOptions().num_proxies == 3
    assert HTTPOptions(num_proxies=2).num_proxies == 2
    monkeypatch.setenv("SHOAL_DEFAULT_NUM_PROXIES", "0")
    with pytest.raises(ValueError, match="SHOAL_DEFAULT_NUM_PROXIES"):
        HTTPOptions()


def test_sched_getaffinity_is_what_the_default_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_DEFAULT_NUM_PROXIES", raising=False)
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
        assert default_num_proxies() == (1 if cores < 4 else min(4, cores // 2))
