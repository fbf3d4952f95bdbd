"""GPUs: which devices the machine has, and which replica holds which (``CUDA_VISIBLE_DEVICES``).

Detection (``detect_gpus``) happens once, when the supervisor starts: a declared set wins
(``shoal start --gpus N``, ``serve.start(gpus=...)``: a count or a list of device ids, so tests
can run with fake devices); else ``CUDA_VISIBLE_DEVICES`` of the supervisor's environment, if
set (as Ray does: the devices it names are the ones there are); else the devices
``nvidia-smi --query-gpu=index --format=csv,noheader`` lists; else none.

``GpuPool`` is the allocator, pure and synchronous: ``allocate(owner, num_gpus)`` gives a
replica its devices or None (nothing changes then), and ``release(owner)`` gives them back.
Quantities are counted in 1/10000 of a device (as Ray counts resources), so fractions add up
exactly. The rules (Ray's for one node):

- ``num_gpus`` k >= 1 (a whole number): k devices no one uses at all, lowest ids first;
- 0 < ``num_gpus`` < 1: a share of one device; the fullest device the share still fits on
  (packing fractional replicas together, keeping whole devices free), else an unused one;
- ``num_gpus`` 0: no device, and ``CUDA_VISIBLE_DEVICES`` is left as the replica inherits it
  (Ray 2.60 no longer sets it to "" when no GPU is assigned).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_UNITS = 10_000  # a device, in the units quantities are counted in
_NVIDIA_SMI_TIMEOUT_S = 10.0


def units(num_gpus: float) -> int:
    """``num_gpus`` in 1/10000 of a device (rounded as Ray rounds resource quantities)."""
    return round(num_gpus * _UNITS)


def parse_gpus(value: int | str | Sequence[str | int]) -> tuple[str, ...]:
    """The device ids a ``--gpus`` / ``gpus=`` value declares: a count N (``"0"`` to
    ``"N-1"``), or device ids (a list, or a comma-separated string such as ``"0,2"``).
    ValueError for a negative count or a duplicated id."""
    if isinstance(value, bool):
        raise ValueError(f"gpus must be a count or a list of device ids, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"gpus must not be negative, got {value}")
        return tuple(str(i) for i in range(value))
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_gpus(int(text))
        ids = [part.strip() for part in text.split(",") if part.strip()]
    else:
        ids = [str(part).strip() for part in value]
    if len(set(ids)) != len(ids):
        raise ValueError(f"gpus names a device twice: {value!r}")
    return tuple(ids)


def detect_gpus(declared: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The machine's GPU device ids (see the module docstring for the order of the sources)."""
    if declared is not None:
        return tuple(declared)
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1")
    return _nvidia_smi_devices()


def _nvidia_smi_devices() -> tuple[str, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        result = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if result.returncode != 0:
        return ()
    return tuple(line.strip() for line in result.stdout.splitlines() if line.strip())


def check_request(num_gpus: float, devices: int) -> str | None:
    """Why a replica asking for ``num_gpus`` can never start on a machine with ``devices`` GPUs
    (a message naming ``num_gpus``), or None if it can once enough are free."""
    if num_gpus <= 0:
        return None
    if num_gpus > 1 and units(num_gpus) % _UNITS:
        return (
            f"ray_actor_options['num_gpus']={num_gpus:g}: a request for more than one GPU must be a "
            "whole number of GPUs (fractions share a single device)"
        )
    if units(num_gpus) > devices * _UNITS:
        return (
            f"ray_actor_options['num_gpus']={num_gpus:g} asks for more GPUs per replica than this "
            f"machine has ({devices}); declare GPUs with `shoal start --gpus N` or "
            "`serve.start(gpus=N)` if they are not detected"
        )
    return None


@dataclass
class GpuPool:
    """The devices of the machine and who holds how much of each."""

    devices: tuple[str, ...]
    _used: dict[str, int] = field(default_factory=dict)  # device -> units in use
    _held: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # owner -> (device, units)

    def allocate(self, owner: str, num_gpus: float) -> tuple[str, ...] | None:
        """The devices ``owner`` now holds for ``num_gpus`` (empty for 0), or None if not enough
        are free (nothing is taken then). ValueError if ``owner`` already holds some."""
        if owner in self._held:
            raise ValueError(f"{owner} already holds GPUs {self.devices_of(owner)}")
        want = units(num_gpus)
        if want <= 0:
            return ()
        if want >= _UNITS:
            free = [d for d in self.devices if self._used.get(d, 0) == 0]
            count = want // _UNITS
            if len(free) < count:
                return None
            taken = tuple((d, _UNITS) for d in free[:count])
        else:
            fits = [d for d in self.devices if self._used.get(d, 0) + want <= _UNITS]
            if not fits:
                return None
            # The fullest device it fits on (first by id among equals): shares pack together.
            best = max(fits, key=lambda d: (self._used.get(d, 0), -self.devices.index(d)))
            taken = ((best, want),)
        for device, amount in taken:
            self._used[device] = self._used.get(device, 0) + amount
        self._held[owner] = taken
        return tuple(device for device, _ in taken)

    def release(self, owner: str) -> None:
        """Give back what ``owner`` holds (nothing if it holds nothing)."""
        for device, amount in self._held.pop(owner, ()):
            left = self._used.get(device, 0) - amount
            if left > 0:
                self._used[device] = left
            else:
                self._used.pop(device, None)

    def devices_of(self, owner: str) -> tuple[str, ...]:
        return tuple(device for device, _ in self._held.get(owner, ()))

    @property
    def free_devices(self) -> int:
        """Devices nobody holds any share of."""
        return sum(1 for d in self.devices if self._used.get(d, 0) == 0)

    def shortage(self, name: str, waiting: int, num_gpus: float) -> str:
        """The status message of deployment ``name`` with ``waiting`` replicas that asked for
        ``num_gpus`` each and could not get them."""
        replicas = "replica" if waiting == 1 else "replicas"
        total = len(self.devices)
        if units(num_gpus) >= _UNITS:
            free = f"{self.free_devices} of {total} GPUs are free"
        else:
            most = max((_UNITS - self._used.get(d, 0) for d in self.devices), default=0)
            free = f"no GPU has {num_gpus} free (the most free on one of the {total} GPUs is {most / _UNITS:g})"
        return (
            f"Deployment {name} has {waiting} {replicas} waiting for resources: it asks for "
            f"num_gpus={num_gpus:g} and {free}."
        )
