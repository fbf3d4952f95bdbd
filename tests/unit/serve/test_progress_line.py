"""The deploy progress line: ``_progress.render`` on fake status reports and a fake clock, the
displays on in-memory streams, and ``Watch`` driven by a fake fetch (no process)."""

from __future__ import annotations

import io
import itertools
import threading
from typing import Any

import pytest

from shoal.serve._progress import EXPLAIN_AFTER_S, Line, render
from shoal.serve._progress_writer import PlainLines, TerminalLine, Watch, display_for, fit

T0 = 1_700_000_000.0  # the deploy started (wall-clock seconds)


def replica(state: str, started_s: float = T0, version: str = "v2") -> dict[str, Any]:
    return {"replica_id": f"a#D#{state}{started_s}", "state": state, "pid": 1, "version": version, "start_time_s": started_s}


def deployment(status: str = "UPDATING", *replicas: dict[str, Any], target: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "status": status, "status_trigger": "CONFIG_UPDATE_STARTED", "message": "", "replicas": list(replicas),
        "restarts": 0, "last_error": "", "version": "v2", "target_num_replicas": target, "failed_starts": 0,
        "reconfiguring": False, "waiting_for_resources": "", **extra,
    }


def report(deployments: dict[str, dict[str, Any]], app_status: str = "DEPLOYING", app: str = "default") -> dict[str, Any]:
    return {"applications": {app: {"status": app_status, "message": "", "deployments": deployments}}}


def text_at(status: dict[str, Any], elapsed_s: float, apps: tuple[str, ...] = ("default",)) -> str:
    return render(status, apps, T0, T0 + elapsed_s).text


# -- render -----------------------------------------------------------------------------------


def test_counts_the_replicas_up_of_each_deployment_still_starting() -> None:
    status = report({
        "Model": deployment("UPDATING", replica("RUNNING"), replica("STARTING"), target=3),
        "Ingress": deployment("HEALTHY", replica("RUNNING")),
    })
    assert text_at(status, 1) == "deploying 'default' (1 s): Model 1/3 up"


def test_old_version_replicas_do_not_count_as_up() -> None:
    status = report({"Model": deployment("UPDATING", replica("RUNNING", version="v1"), replica("STARTING"))})
    assert text_at(status, 0) == "deploying 'default' (0 s): Model 0/1 up"


def test_says_nothing_once_the_apps_are_running_failed_or_gone() -> None:
    for app_status in ("RUNNING", "DEPLOY_FAILED"):
        assert render(report({"D": deployment("HEALTHY")}, app_status), ["default"], T0, T0 + 9) == Line("", "")
    assert text_at(report({"D": deployment()}), 9, apps=("other",)) == ""


def test_names_the_running_constructor_after_a_few_seconds() -> None:
    status = report({"Model": deployment("UPDATING", replica("STARTING", T0 + 0.5))})
    assert "constructor" not in text_at(status, EXPLAIN_AFTER_S - 0.1)
    line = text_at(status, 12.7)
    assert line == "deploying 'default': Model 0/1 up; constructor of Model still running (12 s)"
    assert len(line) < 80  # the usual line fits a terminal


def test_the_key_leaves_the_clocks_out() -> None:
    status = report({"Model": deployment("UPDATING", replica("STARTING"))})
    first, later = render(status, ["default"], T0, T0 + 4), render(status, ["default"], T0, T0 + 40)
    assert first.text != later.text
    assert first.key == later.key == "deploying 'default': Model 0/1 up; constructor of Model still running"


def test_several_constructors_are_counted_and_the_oldest_is_timed() -> None:
    status = report({"Model": deployment("UPDATING", replica("STARTING", T0 + 2), replica("STARTING", T0), target=2)})
    assert text_at(status, 10).endswith("constructors of Model still running (2 replicas, 10 s)")


def test_failed_attempts_are_named_with_the_last_error_line() -> None:
    error = "Traceback (most recent call last):\n  File ...\nValueError: no weights\n"
    starting = deployment("UPDATING", replica("STARTING", T0 + 5), failed_starts=2, last_error=error)
    assert text_at(report({"M": starting}), 6).endswith(
        "constructor of M still running (1 s, 2 failed before: ValueError: no weights)"
    )
    backing_off = deployment("UPDATING", failed_starts=1, last_error=error)
    assert text_at(report({"M": backing_off}), 6).endswith("constructor of M failed (ValueError: no weights); retrying")
    assert "Traceback" not in text_at(report({"M": starting}), 6)


def test_waiting_for_a_gpu() -> None:
    message = "Deployment M has 1 replica waiting for resources: it asks for num_gpus=1 and 0 of 1 GPUs are free."
    status = report({"M": deployment("UPDATING", waiting_for_resources=message)})
    assert text_at(status, 5).endswith("; M waiting for a GPU (it asks for num_gpus=1 and 0 of 1 GPUs are free)")


def test_a_crashed_replica_restarting() -> None:
    crashed = "replica default#M#ab12 (pid 41) died unexpectedly (killed by SIGKILL)"
    backing_off = deployment("UNHEALTHY", replica("RUNNING"), target=2, last_error=crashed, restarts=1)
    assert text_at(report({"M": backing_off}), 5).endswith("; replica of M restarting after a crash (killed by SIGKILL)")
    restarting = deployment("UNHEALTHY", replica("RUNNING"), replica("STARTING", T0 + 3), target=2, last_error=crashed)
    assert text_at(report({"M": restarting}), 5).endswith(
        "; replica of M restarting after a crash (killed by SIGKILL), constructor of M still running (2 s)"
    )
    assert text_at(report({"M": restarting}), 5).startswith("deploying 'default': M 1/2 up;"
    )


def test_a_replica_replaced_after_failing_health_checks() -> None:
    error = "replica default#M#ab12 (pid 41) is unhealthy: check_health raised: boom"
    status = report({"M": deployment("UNHEALTHY", replica("RUNNING"), target=2, last_error=error)})
    assert text_at(status, 5).endswith("; replica of M replaced after failing its health checks")


def test_reconfigure_and_draining() -> None:
    status = report({"M": deployment("UPDATING", replica("RUNNING"), reconfiguring=True)})
    assert text_at(status, 5).endswith("; reconfigure of M still running")
    draining = report({"M": deployment("UPDATING", replica("RUNNING"), replica("STOPPING", version="v1"))})
    assert text_at(draining, 5) == "deploying 'default' (5 s): M 1/1 up; old replicas of M still draining"


def test_a_failed_deployment_gets_no_reason() -> None:
    status = report({"M": deployment("DEPLOY_FAILED", last_error="ValueError: x", failed_starts=3)})
    assert text_at(status, 5) == "deploying 'default' (5 s): M 0/1 up"


def test_several_apps_qualify_their_deployments() -> None:
    status = {"applications": {
        **report({"M": deployment("UPDATING", replica("STARTING"))}, app="a")["applications"],
        **report({"M": deployment("HEALTHY", replica("RUNNING"))}, app="b")["applications"],
        **report({"N": deployment("UPDATING")}, app="c")["applications"],
    }}
    assert text_at(status, 4, apps=("a", "b", "c")) == (
        "deploying 'a', 'b', 'c': a/M 0/1 up, c/N 0/1 up; constructor of a/M still running (4 s)"
    )


def test_a_report_without_the_progress_fields_still_renders() -> None:
    status = report({"M": {"status": "UPDATING", "replicas": [{"replica_id": "x", "state": "STARTING"}]}})
    assert text_at(status, 4) == "deploying 'default' (4 s): M 0/1 up; constructor of M still running"


# -- displays ---------------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_line_rewrites_in_place_fits_the_width_and_erases_on_close() -> None:
    out = io.StringIO()
    line = TerminalLine(out, width=lambda: 20)
    line.close()  # nothing shown yet: nothing to erase
    line.show(Line("deploying 'a' (1 s)", ""), 1)
    line.show(Line("deploying 'default' (2 s): Model 0/1 up", ""), 2)
    line.close()
    assert out.getvalue() == "\rdeploying 'a' (1 s)\x1b[K" "\rdeploying 'defau...\x1b[K" "\r\x1b[K"


def test_terminal_line_erases_when_nothing_is_left() -> None:
    out = io.StringIO()
    line = TerminalLine(out, width=lambda: 80)
    line.show(Line("", ""), 0)
    assert out.getvalue() == ""
    line.show(Line("x", "x"), 1)
    line.show(Line("", ""), 2)
    line.close()
    assert out.getvalue() == "\rx\x1b[K\r\x1b[K"


def test_plain_lines_are_quiet_at_first_then_one_per_change_and_repeated_when_slow() -> None:
    said: list[tuple[str, float]] = []
    plain = PlainLines(lambda text, elapsed_s: said.append((text, elapsed_s)), quiet_s=2, repeat_s=30)
    for elapsed_s, key in [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (20, "b"), (34, "b"), (35, "b"), (36, "")]:
        plain.show(Line(f"{key} {elapsed_s}" if key else "", key), elapsed_s)
    assert said == [("a 2", 2), ("b 4", 4), ("b 34", 34)]


def test_fit() -> None:
    assert fit("abcdef", 6) == "abcdef"
    assert fit("abcdef", 5) == "ab..."
    assert fit("abcdef", 2) == "ab"


def test_display_for_a_terminal_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    assert isinstance(display_for(Tty(), None), TerminalLine)
    assert isinstance(display_for(io.StringIO(), lambda text, s: None), PlainLines)
    assert display_for(io.StringIO(), None) is None
    monkeypatch.setenv("TERM", "dumb")
    assert display_for(Tty(), None) is None


# -- Watch ------------------------------------------------------------------------------------


class Recorder:
    """A display that records what it is shown, and lets the test wait for the n-th line."""

    def __init__(self) -> None:
        self.shown: list[tuple[str, float]] = []
        self.closed = False
        self.changed = threading.Condition()

    def show(self, line: Line, elapsed_s: float) -> None:
        with self.changed:
            assert not self.closed, "shown after close"
            self.shown.append((line.text, elapsed_s))
            self.changed.notify_all()

    def close(self) -> None:
        self.closed = True

    def wait_for(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.shown) >= n, timeout=10)


def test_watch_shows_renders_on_its_clock_and_stops_cleanly() -> None:
    ticks = itertools.chain([T0], itertools.count(T0 + 4))  # started at T0, then 4, 5, 6 ... s later
    status = report({"Model": deployment("UPDATING", replica("STARTING", T0))})
    display = Recorder()
    with Watch(lambda: status, ["default"], display, clock=lambda: next(ticks), interval_s=0.001):
        display.wait_for(2)
    assert display.closed
    assert display.shown[:2] == [
        ("deploying 'default': Model 0/1 up; constructor of Model still running (4 s)", 4),
        ("deploying 'default': Model 0/1 up; constructor of Model still running (5 s)", 5),
    ]  # (a line shown after close would fail the recorder's assertion in the thread)


def test_watch_skips_failed_fetches_and_stops_on_an_exception_in_the_body() -> None:
    calls = iter([RuntimeError("no answer")] + [report({"M": deployment()})] * 1000)

    def fetch() -> dict[str, Any]:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    display = Recorder()
    with pytest.raises(KeyboardInterrupt), Watch(fetch, ["default"], display, interval_s=0.001):
        display.wait_for(1)
        raise KeyboardInterrupt
    assert display.closed
    assert display.shown[0][0].startswith("deploying 'default'")


def test_watch_without_a_display_starts_no_thread() -> None:
    before = threading.active_count()
    with Watch(lambda: {}, ["default"], None):
        assert threading.active_count() == before
