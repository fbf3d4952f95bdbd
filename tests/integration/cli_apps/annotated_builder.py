"""A builder in a module with postponed annotations (PEP 563): its parameter's annotation is the
string ``"SuffixArgs"``, which must still select the pydantic model the args are validated into."""

from __future__ import annotations

from typing import Any

from greet_app import Greeter
from pydantic import BaseModel


class SuffixArgs(BaseModel):
    suffix: str
    repeat: int = 1


def builder(args: SuffixArgs) -> Any:
    return Greeter.bind(args.suffix * args.repeat)
