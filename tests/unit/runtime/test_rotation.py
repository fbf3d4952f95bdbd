"""The size-rotating log writer: RotatingFileHandler's contract (rotate before reaching
max_bytes, file.log.1 newest ... file.log.<backup_count> oldest, 0 means never), shared safely
between writers, and Ray's RAY_ROTATION_* limits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shoal.runtime.rotation import (
    DEFAULT_BACKUP_COUNT,
    DEFAULT_MAX_BYTES,
    EVERY_WRITE_S,
    LONE_RECHECK_S,
    SHARED_RECHECK_S,
    LogRotationConfigError,
    RotatingLineFile,
    RotatingLineHandler,
    RotationLimits,
    limits_from_env,
)

_LINE = "x" * 9  # 10 bytes with the newline


def _family(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_the_file_rotates_before_it_would_reach_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "file.log"
    writer = RotatingLineFile(path, RotationLimits(max_bytes=35, backup_count=2))
    for _ in range(3):
        writer.write(_LINE)
    assert _family(path) == ["file.log"] and path.stat().st_size == 30
    writer.write("y" * 9)  # 30 + 10 >= 35: rotate first
    assert _family(path) == ["file.log", "file.log.1"]
    assert path.read_text() == "y" * 9 + "\n"
    assert (tmp_path / "file.log.1").read_text() == (_LINE + "\n") * 3
    writer.close()


def test_only_backup_count_rotated_files_are_kept_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "file.log"
    writer = RotatingLineFile(path, RotationLimits(max_bytes=10, backup_count=2))
    for number in range(6):  # each line fills a file: every write after the first rotates
        writer.write(f"line-{number}")
    writer.close()
    assert _family(path) == ["file.log", "file.log.1", "file.log.2"]
    assert path.read_text() == "line-5\n"
    assert (tmp_path / "file.log.1").read_text() == "line-4\n"
    assert (tmp_path / "file.log.2").read_text() == "line-3\n"


def test_a_line_longer_than_the_limit_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "file.log"
    writer = RotatingLineFile(path, RotationLimits(max_bytes=10, backup_count=1))
    writer.write("z" * 50)
    writer.close()
    assert _family(path) == ["file.log"] and path.read_text() == "z" * 50 + "\n"


@pytest.mark.parametrize("limits", [RotationLimits(0, 3), RotationLimits(10, 0)])
def test_zero_max_bytes_or_backup_count_never_rotates(tmp_path: Path, limits: RotationLimits) -> None:
    path = tmp_path / "file.log"
    writer = RotatingLineFile(path, limits)
    for _ in range(5):
        writer.write(_LINE)
    writer.close()
    assert _family(path) == ["file.log"] and path.stat().st_size == 50


def test_writers_sharing_a_path_follow_each_others_rotations(tmp_path: Path) -> None:
    path = tmp_path / "file.log"
    limits = RotationLimits(max_bytes=25, backup_count=3)
    first, second = RotatingLineFile(path, limits), RotatingLineFile(path, limits)
    for number in range(8):
        (first if number % 2 else second).write(f"line-{number:03d}")  # 9 bytes with the newline
    first.close()
    second.close()
    kept = [(tmp_path / name).read_text() for name in ("file.log.3", "file.log.2", "file.log.1", "file.log")]
    assert "".join(kept) == "".join(f"line-{number:03d}\n" for number in range(8))
    assert all(len(text) < 25 for text in kept)


def test_the_logging_handler_rotates_formatted_records(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    handler = RotatingLineHandler(path, RotationLimits(max_bytes=20, backup_count=1))
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.Logger("rotation-test")
    logger.addHandler(handler)
    for number in range(3):
        logger.warning("msg-%d", number)  # "WARNING msg-N\n": 14 bytes
    handler.close()
    assert _family(path) == ["replica.log", "replica.log.1"]
    assert path.read_text() == "WARNING msg-2\n"
    assert (tmp_path / "replica.log.1").read_text() == "WARNING msg-1\n"


def test_limits_default_to_rays() -> None:
    assert limits_from_env({}) == RotationLimits(512 * 1024 * 1024, 5)
    assert (DEFAULT_MAX_BYTES, DEFAULT_BACKUP_COUNT) == (536870912, 5)
    limits = limits_from_env({"RAY_ROTATION_MAX_BYTES": "4096", "RAY_ROTATION_BACKUP_COUNT": "0"})
    assert limits == RotationLimits(4096, 0)
    assert RotationLimits.from_spec(limits.to_spec()) == limits
    assert RotationLimits.from_spec(None) == RotationLimits()


@pytest.mark.parametrize("name", ["RAY_ROTATION_MAX_BYTES", "RAY_ROTATION_BACKUP_COUNT"])
@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_a_bad_limit_is_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(LogRotationConfigError, match=f"{name} must be a non-negative integer, got '{value}'"):
        limits_from_env({name: value})


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_writer_alone_on_its_path_counts_its_bytes_and_rotates_on_them(tmp_path: Path) -> None:
    path = tmp_path / "file.log"
    writer = RotatingLineFile(path, RotationLimits(max_bytes=35, backup_count=2), shared=False, clock=FakeClock())
    for number in range(4):
        writer.write(f"line-{number:03d}")  # 9 bytes with the newline: the 4th would reach 36
    writer.close()
    assert _family(path) == ["file.log", "file.log.1"]
    assert (tmp_path / "file.log.1").read_text() == "line-000\nline-001\nline-002\n"
    assert path.read_text() == "line-003\n"


def test_a_writer_alone_checks_its_path_every_recheck_s(tmp_path: Path) -> None:
    """Something else moved the file away: the lone writer notices at its next check, not
    before (it makes no system call but the write in between)."""
    path = tmp_path / "file.log"
    clock = FakeClock()
    writer = RotatingLineFile(path, RotationLimits(), shared=False, recheck_s=1.0, clock=clock)
    writer.write("one")
    path.rename(tmp_path / "moved.log")
    clock.now_s = 0.5
    writer.write("two")  # still into the moved file
    clock.now_s = 1.0
    writer.write("three")  # checked: a new file at the path
    writer.close()
    assert (tmp_path / "moved.log").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\n"


@pytest.mark.parametrize("shared", [True, False])
def test_write_lines_batches_and_still_rotates_before_the_limit(tmp_path: Path, shared: bool) -> None:
    path = tmp_path / "file.log"
    writer = RotatingLineFile(path, RotationLimits(max_bytes=25, backup_count=3), shared=shared)
    writer.write_lines([f"line-{number:03d}" for number in range(5)])  # 9 bytes each: two per file
    writer.write_lines([])
    writer.close()
    kept = [(tmp_path / name).read_text() for name in ("file.log.2", "file.log.1", "file.log")]
    assert kept == ["line-000\nline-001\n", "line-002\nline-003\n", "line-004\n"]


def test_a_shared_writer_checks_every_write_by_default_and_a_lone_one_every_second(tmp_path: Path) -> None:
    assert RotatingLineFile(tmp_path / "a.log", RotationLimits()).recheck_s == EVERY_WRITE_S == 0
    assert RotatingLineFile(tmp_path / "b.log", RotationLimits(), shared=False).recheck_s == LONE_RECHECK_S
    assert RotatingLineFile(tmp_path / "c.log", RotationLimits(), recheck_s=SHARED_RECHECK_S).recheck_s == 0.1


def test_a_shared_writer_with_recheck_s_sees_the_others_growth_only_at_its_next_check(tmp_path: Path) -> None:
    """Between checks it counts its own bytes: another writer's lines make the file overshoot
    by at most what that writer wrote since the last check (plus one line); the check after
    ``recheck_s`` sees them and rotates before the next write that would reach the limit."""
    path = tmp_path / "file.log"
    limits = RotationLimits(max_bytes=40, backup_count=2)
    clock = FakeClock()
    checker = RotatingLineFile(path, limits, recheck_s=0.1, clock=clock)
    other = RotatingLineFile(path, limits)  # stats before every write (the supervisor's)
    checker.write("mine-0000")  # 10 bytes with the newline
    other.write_lines(["them-0000", "them-0001"])  # 30: the other writer knows
    clock.now_s = 0.05
    checker.write("mine-0001")  # believes 20: no rotation, the file is 40
    assert _family(path) == ["file.log"] and path.stat().st_size == 40
    assert path.stat().st_size <= limits.max_bytes + 20  # the bound: the other's bytes since the check
    clock.now_s = 0.1
    checker.write("mine-0002")  # checked: 40 + 10 >= 40, rotate first
    assert _family(path) == ["file.log", "file.log.1"]
    assert path.read_text() == "mine-0002\n"
    assert (tmp_path / "file.log.1").read_text() == "mine-0000\nthem-0000\nthem-0001\nmine-0001\n"
    checker.close()
    other.close()


def test_a_shared_writer_with_recheck_s_follows_anothers_rotation_at_its_next_check(tmp_path: Path) -> None:
    """Until then its lines go to the rotated file: none is lost."""
    path = tmp_path / "file.log"
    limits = RotationLimits(max_bytes=25, backup_count=3)
    clock = FakeClock()
    checker = RotatingLineFile(path, limits, recheck_s=0.1, clock=clock)
    other = RotatingLineFile(path, limits)
    checker.write("mine-0")  # 7 bytes
    other.write("them-0" + "x" * 10)  # 7 + 17 = 24
    other.write("them-1")  # 24 + 7 >= 25: the other writer rotates
    clock.now_s = 0.09
    checker.write("mine-1")  # not checked yet: into the rotated file
    clock.now_s = 0.2
    checker.write("mine-2")  # checked: the new file
    checker.close()
    other.close()
    assert (tmp_path / "file.log.1").read_text() == "mine-0\nthem-0xxxxxxxxxx\nmine-1\n"
    assert path.read_text() == "them-1\nmine-2\n"
