"""What a replica tells request routers about itself: the multiplexed models it holds.

``shoal.serve.multiplex`` calls ``set_model_ids`` whenever the set of models loaded or loading
in this process changes; each change gets a new version. The replica worker listens
(``set_listener``) and pushes the newest set to the supervisor (at most once per loop
iteration), which puts it in the next routing snapshot; replies to multiplexed calls carry it
too (``current``), so the caller that made the replica load a model knows at once.
Outside a replica worker (local testing mode, a driver) nobody listens.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from shoal.runtime import wire

_current: wire.ModelIds | None = None
_listener: Callable[[wire.ModelIds], None] | None = None
_shutdown_hooks: list[Callable[[], Coroutine[Any, Any, None]]] = []


def set_model_ids(ids: Iterable[str]) -> None:
    """The models this replica holds are now ``ids`` (ignored if unchanged)."""
    global _current
    fresh = tuple(sorted(ids))
    if _current is not None and _current.ids == fresh:
        return
    _current = wire.ModelIds((_current.version if _current is not None else 0) + 1, fresh)
    if _listener is not None:
        _listener(_current)


def current() -> wire.ModelIds | None:
    """The newest set, or None if this process never held a multiplexed model."""
    return _current


def set_listener(listener: Callable[[wire.ModelIds], None] | None) -> None:
    """Call ``listener`` with each new set (on the thread that changed it: the replica's loop)."""
    global _listener
    _listener = listener


def on_shutdown(hook: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Await ``hook`` when the replica stops (once, however often it is registered): it unloads
    the multiplexed models, calling their ``__del__``."""
    if hook not in _shutdown_hooks:
        _shutdown_hooks.append(hook)


async def shutdown() -> None:
    """Run the shutdown hooks (the replica worker calls this as it stops)."""
    for hook in _shutdown_hooks:
        await hook()
