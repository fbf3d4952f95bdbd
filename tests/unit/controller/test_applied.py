"""shoal.controller.applied: what a supervisor saves for the next one, on a real directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shoal.controller import applied


def test_saved_specs_come_back_and_the_file_is_private(tmp_path: Path) -> None:
    specs = [{"name": "a", "deployments": [{"name": "D", "definition": b"\x80\x05pickled", "config": {}}]}]
    applied.save(tmp_path, specs)
    saved = tmp_path / applied.APPLIED_FILE
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert applied.load(tmp_path) == specs
    applied.save(tmp_path, [])  # replaced whole, no temporary file left
    assert applied.load(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [applied.APPLIED_FILE]
    applied.clear(tmp_path)
    applied.clear(tmp_path)  # twice is fine
    assert applied.load(tmp_path) == []


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / applied.APPLIED_FILE).write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match=applied.APPLIED_FILE):
        applied.load(tmp_path)
    (tmp_path / applied.APPLIED_FILE).write_bytes(b"\x81\xa1a\x01")  # a map, not a list
    with pytest.raises(ValueError, match="not a saved application list"):
        applied.load(tmp_path)
