"""The shared helpers of the experiment scripts: RESULTS.md sections and the paired statistics."""

import math
import multiprocessing as mp

import pytest
from scipy import stats

from defenses import stats as stats_module
from experiments._results import format_delta, mean_std, paired_ci, write_section


def _write_many(path, name, count, barrier):
    barrier.wait(timeout=120)  # start together, so the writes overlap
    for i in range(count):
        write_section(name, f"{name} version {i}", path)


def test_sections_are_replaced_in_place_and_others_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("a", "first", path)
    write_section("b", "second", path)
    write_section("a", "first, again", path)
    text = path.read_text()
    assert text.count("<!-- BEGIN a -->") == 1 and "first, again" in text and "first\n" not in text
    assert text.index("BEGIN a") < text.index("BEGIN b")


def test_concurrent_writers_do_not_drop_each_others_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    context = mp.get_context("spawn")
    barrier = context.Barrier(4)
    writers = [context.Process(target=_write_many, args=(path, f"s{k}", 200, barrier)) for k in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    text = path.read_text()
    for k in range(4):
        assert text.count(f"<!-- BEGIN s{k} -->") == 1
        assert f"s{k} version 199" in text


def test_paired_interval_matches_scipy():
    a, b = [0.81, 0.84, 0.80, 0.86, 0.83], [0.78, 0.80, 0.79, 0.81, 0.80]
    mean, (low, high) = paired_ci(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    expected = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / len(diffs), scale=stats.sem(diffs))
    assert mean == pytest.approx(sum(diffs) / len(diffs))
    assert (low, high) == pytest.approx(expected)
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert format_delta(a, b) == f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def test_paired_interval_is_absent_where_the_statistics_module_gives_none():
    for a, b in (([0.75, 0.5, 0.25], [0.5, 0.25, 0.0]), ([0.75], [0.5])):  # identical differences; one pair
        mean, (low, high) = paired_ci(a, b)
        assert stats_module.paired_difference(a, b)["ci95"] is None
        assert mean == 0.25 and math.isnan(low) and math.isnan(high)
        assert format_delta(a, b) == "+25.00"
    a, b = [0.81, 0.84, 0.80], [0.78, 0.80, 0.79]
    assert list(paired_ci(a, b)[1]) == stats_module.paired_difference(a, b)["ci95"]
