"""Apps the CLI tests serve: ``greet_app:app`` (an Application) and ``greet_app:builder``
(a builder function whose args are validated into a pydantic model). No ``from __future__
import annotations`` here: the builder's annotation is the model class itself."""

import os
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request

from shoal import serve


@serve.deployment(user_config={"greeting": "hello"})
class Greeter:
    def __init__(self, suffix: str = "") -> None:
        self.suffix = suffix
        self.greeting = "unset"

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.greeting = config["greeting"]

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"greeting": self.greeting + self.suffix, "pid": os.getpid()}


app = Greeter.bind()


class GreeterArgs(BaseModel):
    suffix: str
    repeat: int = 1


def builder(args: GreeterArgs) -> Any:
    return Greeter.bind(args.suffix * args.repeat)
