"""The CLI's --gpus option and the waiting-for-GPUs message in `shoal status` (no processes)."""

from __future__ import annotations

import pytest

from shoal import cli


def test_gpus_option_takes_a_count_or_device_ids() -> None:
    parser = cli._parser()
    assert parser.parse_args(["start", "--gpus", "2"]).gpus == ("0", "1")
    assert parser.parse_args(["run", "app:app", "--gpus", "1,3"]).gpus == ("1", "3")
    assert parser.parse_args(["start"]).gpus is None  # detect
    with pytest.raises(SystemExit):
        parser.parse_args(["start", "--gpus", "0,0"])


def test_status_shows_a_deployment_waiting_for_gpus() -> None:
    waiting = "Deployment D has 1 replica waiting for resources: it asks for num_gpus=1 and 0 of 2 GPUs are free."
    status = {
        "proxies": {},
        "applications": {"app": {
            "status": "DEPLOYING", "message": "", "last_deployed_time_s": 0.0, "route_prefix": None, "ingress": "D",
            "deployments": {"D": {
                "status": "UPDATING", "status_trigger": "CONFIG_UPDATE_STARTED", "replica_states": {},
                "message": waiting, "replicas": [], "restarts": 0, "last_error": "",
            }},
        }},
        "target_capacity": None,
    }
    assert f"app/D: {waiting}" in cli.format_status(status)
