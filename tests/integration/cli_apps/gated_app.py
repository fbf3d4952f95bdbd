"""An app whose ``Model`` constructor waits on a gate the test controls: a FIFO (named pipe)
whose path is the builder's ``gate`` argument. Opening a FIFO for reading blocks until a writer
opens it, and reading returns once the writer closes it; no sleep and no polling."""

from typing import Any

from starlette.requests import Request

from shoal import serve


@serve.deployment
class Model:
    def __init__(self, gate: str) -> None:
        with open(gate) as fifo:
            fifo.read()

    def __call__(self, text: str) -> str:
        return text.upper()


@serve.deployment
class Ingress:
    def __init__(self, model: Any) -> None:
        self.model = model

    async def __call__(self, request: Request) -> str:
        return str(await self.model.remote("ok"))


def app(args: dict[str, str]) -> Any:
    return Ingress.bind(Model.bind(args["gate"]))
