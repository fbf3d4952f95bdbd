"""benchmarks/_common.py: the pure parts every benchmark report is made of (no processes)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "_common.py"


@pytest.fixture(scope="module")
def common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["bench_common"]
    return module


def test_spread_is_median_and_range_of_the_figures_present(common: ModuleType) -> None:
    s = common.spread([3.0, None, 1.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (3.0, 1.0, 10.0, 3)
    assert common.spread([None]) is None


def test_spreads_skips_keys_that_are_not_numbers(common: ModuleType) -> None:
    runs = [{"rps": 10.0, "client": "wrk", "ok": True}, {"rps": 30.0, "client": "wrk", "ok": True}]
    assert set(common.spreads(runs)) == {"rps"}
    assert common.spreads(runs, ["rps", "missing"])["rps"].median == 20.0


def test_cell_shows_the_range_only_when_there_is_one(common: ModuleType) -> None:
    assert common.cell(common.spread([1500.0, 1000.0, 2000.0])) == "1,500 (1,000-2,000)"
    assert common.cell(common.spread([1500.0])) == "1,500"
    assert common.cell(None) == "-"


def test_ratio_of_medians(common: ModuleType) -> None:
    assert common.ratio(common.spread([1.0, 3.0]), common.spread([4.0])) == "0.5"
    assert common.ratio(common.spread([1.0]), None) == "-"


def test_comma_list_refuses_an_unknown_item_by_name(common: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    assert common.comma_list(parser, "a,,b", ("a", "b"), "targets") == ["a", "b"]
    with pytest.raises(SystemExit):
        common.comma_list(parser, "a,zz", ("a", "b"), "targets")
    assert "unknown targets: zz" in capsys.readouterr().err


def test_no_ray_is_a_skipped_peer_with_its_reason(common: ModuleType) -> None:
    peer = common.find_ray(argparse.Namespace(no_ray=True, ray_python=None))
    assert peer.python is None and peer.skipped == "--no-ray"


def test_report_prints_facts_targets_and_one_table_in_both_forms(common: ModuleType) -> None:
    report = common.Report("t", "/x/benchmarks/demo.py", runs=3)
    report.add_peer(common.Peer("ray", None, skipped="--no-ray"))
    report.columns = ["metric", "shoal", common.TARGET_HEADER]
    report.add_row("p50 | us", "12", common.ISSUE11["handle_p50_async_us"])
    report.add_failures({"shoal": ["exit 1\nmore"]})
    for markdown in (False, True):
        text = report.render(markdown)
        for expected in ("machine", "load avg", "versions", "Python", "skipped ray", "--no-ray",
                         "median of 3 run(s)", "target (issue 11, measured on a faster machine)",
                         "<= 120 us", "shoal: 1 run(s) failed", "exit 1"):
            assert expected in text, (markdown, expected)
    md = report.render(True).splitlines()
    assert "| metric | shoal | target (issue 11, measured on a faster machine) |" in md
    assert "| p50 \\| us | 12 | <= 120 us |" in md


def test_nested_spreads_groups_figures_by_their_key_over_the_runs_that_have_them(common: ModuleType) -> None:
    runs = [
        {"sizes": {"1": {"ms": 2.0, "label": "x"}, "64": {"ms": 40.0}}},
        {"sizes": {"1": {"ms": 4.0, "label": "x"}}},
        {"sizes": {"1": {"ms": 3.0, "label": "x"}, "64": {"ms": 50.0}}},
    ]
    med = common.nested_spreads(runs, "sizes", iter(["ms"]))  # keys used for every group
    assert list(med) == ["1", "64"]
    assert (med["1"]["ms"].median, med["1"]["ms"].n) == (3.0, 3)
    assert (med["64"]["ms"].low, med["64"]["ms"].high, med["64"]["ms"].n) == (40.0, 50.0, 2)
    assert set(common.nested_spreads(runs, "sizes")["1"]) == {"ms"}
    assert common.nested_spreads([{"error": "boom"}], "sizes") == {}
