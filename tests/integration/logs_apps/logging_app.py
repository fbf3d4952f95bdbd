"""The app ``shoal logs`` is tested on: two deployments that log a known line as they start, and
an ingress that logs the ``say`` query parameter of every request."""

import logging

from starlette.requests import Request

from shoal import serve
from shoal.serve.handle import DeploymentHandle

logger = logging.getLogger("ray.serve")


@serve.deployment
class Child:
    def __init__(self) -> None:
        logger.info("child-started-marker")

    def ping(self) -> str:
        return "pong"


@serve.deployment
class Ingress:
    def __init__(self, child: DeploymentHandle) -> None:
        self.child = child
        logger.info("ingress-started-marker")

    async def __call__(self, request: Request) -> str:
        logger.info("said %s", request.query_params.get("say", ""))
        return await self.child.ping.remote()


app = Ingress.bind(Child.bind())
