"""A second application for the declarative-deploy tests: ``other_app:app``."""

import os
from typing import Any

from starlette.requests import Request

from shoal import serve


@serve.deployment
class Other:
    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"app": "other", "pid": os.getpid()}


app = Other.bind()
