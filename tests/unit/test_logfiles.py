"""``controller.logfiles``: timestamps, labels, filters and the time-ordered merge, on files
written here (no processes)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from shoal.controller import logfiles
from shoal.controller.logfiles import Tail, classify, timestamp


def _text(clock: str, message: str) -> str:
    return f"INFO 2026-12-02 {clock} ray.serve - -- {message}"


def _json(clock: str, message: str) -> str:
    return json.dumps({"asctime": f"2026-12-02 {clock}", "levelname": "INFO", "message": message})


def _write(path: Path, *lines: str) -> None:
    with path.open("a") as handle:
        handle.write("".join(line + "\n" for line in lines))


def test_timestamps_of_text_json_and_plain_lines() -> None:
    assert timestamp(_text("10:19:41,123", "x")) == datetime(2026, 12, 2, 10, 19, 41, 123000)
    assert timestamp(_json("10:19:41,5", "x")) == datetime(2026, 12, 2, 10, 19, 41, 500000)
    assert timestamp("(ProxyActor) " + _text("01:02:03,004", "x")) == datetime(2026, 12, 2, 1, 2, 3, 4000)
    assert timestamp("2026-12-02T10:00:00 started") == datetime(2026, 12, 2, 10, 0, 0)
    assert timestamp("Traceback (most recent call last):") is None
    assert timestamp('{"message": "no time"}') is None
    assert timestamp("{not json 2026-12-02 10:00:00") == datetime(2026, 12, 2, 10, 0, 0)
    assert timestamp("INFO 2026-13-45 10:00:00 bad date") is None


def test_replica_file_names_and_labels(tmp_path: Path) -> None:
    plain = classify(tmp_path / "replica_default_Hello_16791e80.log")
    assert plain.replica == "16791e80" and plain.candidates == (("default", "Hello"),)
    assert plain.label() == "(ServeReplica:default:Hello replica=16791e80)"
    ambiguous = classify(tmp_path / "replica_my_app_Model_ab.log")
    assert ambiguous.candidates == (("my", "app_Model"), ("my_app", "Model"))
    assert ambiguous.label(app="my_app") == "(ServeReplica:my_app:Model replica=ab)"
    assert ambiguous.label(deployment="app_Model") == "(ServeReplica:my:app_Model replica=ab)"
    assert classify(tmp_path / "supervisor.log").label() == ""
    assert classify(tmp_path / "other.log").label() == "(other)"
    assert not classify(tmp_path / "replica_x_1.log").is_replica


def test_filters_match_app_deployment_and_replica(tmp_path: Path) -> None:
    replica = classify(tmp_path / "replica_my_app_Model_ab12.log")
    supervisor = classify(tmp_path / "supervisor.log")
    assert replica.matches(None, None, None) and supervisor.matches(None, None, None)
    assert replica.matches("my_app", None, None) and replica.matches("my", None, None)
    assert replica.matches("my_app", "Model", None) and not replica.matches("my", "Model", None)
    assert not replica.matches("other", None, None) and not replica.matches(None, "Other", None)
    assert replica.matches(None, None, "ab12") and replica.matches(None, None, "my_app#Model#ab12")
    assert not replica.matches(None, None, "cd34")
    assert not supervisor.matches("my_app", None, None)


def test_merge_orders_by_time_and_keeps_untimed_lines_after_their_predecessor(tmp_path: Path) -> None:
    _write(
        tmp_path / "replica_app_A_1.log",
        "early line without time",
        _text("10:00:01,000", "a1"),
        "Traceback of a1",
        _text("10:00:04,000", "a4"),
    )
    _write(tmp_path / "replica_app_B_2.log", _json("10:00:02,000", "b2"), _json("10:00:03,000", "b3"))
    _write(
        tmp_path / "supervisor.log",
        "(shoal supervisor) INFO starting",
        "(ServeReplica:app:A pid=9, replica=1) " + _text("10:00:01,000", "a1"),  # an echo: skipped
        "(ProxyActor) " + _text("10:00:02,500", "p"),
        "plain supervisor line",
    )
    lines = Tail(tmp_path).poll()
    messages = [line.rsplit(" ", 1)[-1].strip('"}') for line in lines]
    assert messages == ["time", "starting", "a1", "a1", "b2", "p", "line", "b3", "a4"]
    assert lines[0] == "(ServeReplica:app:A replica=1) early line without time"
    assert lines[3] == "(ServeReplica:app:A replica=1) Traceback of a1"
    assert lines[6] == "(shoal supervisor) plain supervisor line"
    assert sum("(ServeReplica:" in line for line in lines) == 6  # the echo is not printed twice


def test_filters_select_files(tmp_path: Path) -> None:
    _write(tmp_path / "replica_app_A_1.log", _text("10:00:01,000", "a"))
    _write(tmp_path / "replica_app_B_2.log", _text("10:00:02,000", "b"))
    _write(tmp_path / "replica_other_A_3.log", _text("10:00:03,000", "c"))
    _write(tmp_path / "supervisor.log", "(ProxyActor) INFO p")
    assert [line[-1] for line in Tail(tmp_path, app="app").poll()] == ["a", "b"]
    assert [line[-1] for line in Tail(tmp_path, deployment="A").poll()] == ["a", "c"]
    assert [line[-1] for line in Tail(tmp_path, app="app", deployment="A").poll()] == ["a"]
    assert [line[-1] for line in Tail(tmp_path, replica="other#A#3").poll()] == ["c"]
    assert Tail(tmp_path, app="none").poll() == []
    assert Tail(tmp_path / "missing").poll() == []


def test_follow_reads_new_lines_new_files_and_waits_for_complete_lines(tmp_path: Path) -> None:
    tail = Tail(tmp_path)
    assert tail.poll() == []
    _write(tmp_path / "replica_app_A_1.log", _text("10:00:01,000", "a1"))
    assert tail.poll() == ["(ServeReplica:app:A replica=1) " + _text("10:00:01,000", "a1")]
    assert tail.poll() == []
    with (tmp_path / "replica_app_A_1.log").open("a") as handle:
        handle.write("partial")
    _write(tmp_path / "replica_app_B_2.log", _text("10:00:00,000", "b0"))
    assert tail.poll() == ["(ServeReplica:app:B replica=2) " + _text("10:00:00,000", "b0")]
    _write(tmp_path / "replica_app_A_1.log", " line")
    assert tail.poll() == ["(ServeReplica:app:A replica=1) partial line"]
    (tmp_path / "replica_app_A_1.log").write_text("new\n")  # truncated and rewritten
    assert tail.poll() == ["(ServeReplica:app:A replica=1) new"]


def test_untimed_lines_keep_the_time_of_the_previous_poll(tmp_path: Path) -> None:
    lines, last = logfiles.keyed([_text("10:00:05,000", "x")], "(L)")
    follow, _ = logfiles.keyed(["continued"], "(L)", last)
    assert follow[0].at == lines[0].at == datetime(2026, 12, 2, 10, 0, 5)


def test_the_proxys_file_is_labelled_merged_and_selected_by_proxy(tmp_path: Path) -> None:
    proxy = classify(tmp_path / "proxy_127.0.0.1.log")
    assert proxy.is_proxy and not proxy.is_replica and proxy.label() == "(ProxyActor)"
    assert not proxy.matches("app", None, None) and proxy.matches(None, None, None, proxy=True)
    _write(tmp_path / "proxy_127.0.0.1.log", _text("10:00:02,000", "GET / 200 1.0ms"))
    _write(tmp_path / "replica_app_A_1.log", _text("10:00:01,000", "a"), _text("10:00:03,000", "b"))
    _write(tmp_path / "supervisor.log", "(shoal supervisor) INFO s", "(ProxyActor) " + _text("10:00:04,000", "warned"))
    merged = Tail(tmp_path).poll()
    assert [line.rsplit("-- ", 1)[-1] for line in merged] == ["(shoal supervisor) INFO s", "a", "GET / 200 1.0ms", "b", "warned"]
    assert merged[2] == "(ProxyActor) " + _text("10:00:02,000", "GET / 200 1.0ms")
    only = Tail(tmp_path, proxy=True).poll()
    assert [line.rsplit("-- ", 1)[-1] for line in only] == ["GET / 200 1.0ms", "warned"]
    assert all(line.startswith("(ProxyActor) ") for line in only)
    assert not any("ProxyActor" in line for line in Tail(tmp_path, app="app").poll())
