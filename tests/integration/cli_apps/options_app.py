"""Deployments for tests/integration/test_options.py: pids, log lines, and an application-level
autoscaling policy."""

from __future__ import annotations

import logging
import os
from typing import Any

from shoal import serve
from shoal.serve.config import DeploymentID

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=4)
class Pid:
    def __call__(self) -> int:
        return os.getpid()


pid_app = Pid.bind()


_FAST = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0, "downscale_delay_s": 0}


@serve.deployment(autoscaling_config=_FAST)
class Left:
    def __call__(self) -> int:
        return os.getpid()


@serve.deployment(autoscaling_config=_FAST)
class Right:
    def __call__(self) -> int:
        return os.getpid()


@serve.deployment
class Pair:
    def __init__(self, left: Any, right: Any) -> None:
        self.left, self.right = left, right

    def __call__(self) -> str:
        return "pair"


pair_app = Pair.bind(Left.bind(), Right.bind())


def three_each(contexts: dict[DeploymentID, Any]) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
    """An application-level policy: 3 replicas for every autoscaling deployment."""
    return {dep: 3 for dep in contexts}, {}


class Talk:
    """Logs one DEBUG and one WARNING line tagged with ``word``."""

    def __call__(self, word: str = "") -> str:
        logger.debug("debug-%s", word)
        logger.warning("warning-%s", word)
        return word


Inherits = serve.deployment(Talk, name="Inherits")
Debug = serve.deployment(Talk, name="Debug", logging_config={"log_level": "DEBUG"})
Quiet = serve.deployment(Talk, name="Quiet", logging_config={"log_level": "DEBUG", "enable_access_log": False})


@serve.deployment(logging_config={"log_level": "INFO"})
class Front:
    def __init__(self, *others: Any) -> None:
        self.others = others

    def __call__(self, request: Any = None) -> str:
        logger.info("front")
        return "front"


def talk_app(logs_dir: str) -> Any:
    """Front (HTTP) with Inherits, Debug and Quiet behind it; each deployment logs to
    ``logs_dir`` (the app-level config gives the others their ``logs_dir``)."""
    own = {"logs_dir": logs_dir}
    return Front.options(logging_config={"log_level": "INFO", **own}).bind(
        Inherits.bind(),
        Debug.options(logging_config={"log_level": "DEBUG", **own}).bind(),
        Quiet.options(logging_config={"log_level": "DEBUG", "enable_access_log": False, **own}).bind(),
    )
