"""The example app `shoal run examples.hello:app` serves: GET / -> "Hello from shoal!",
GET /?name=Ada -> "Hello Ada!"; composed of an ingress and a downstream deployment."""

from starlette.requests import Request

from shoal import serve
from shoal.serve.handle import DeploymentHandle


@serve.deployment
class Greeter:
    def greet(self, name: str) -> str:
        return f"Hello {name}!"


@serve.deployment
class Hello:
    def __init__(self, greeter: DeploymentHandle) -> None:
        self.greeter = greeter

    async def __call__(self, request: Request) -> str:
        return await self.greeter.greet.remote(request.query_params.get("name", "from shoal"))


app = Hello.bind(Greeter.bind())
