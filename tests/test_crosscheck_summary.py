"""The cross-check page's summary: each method's row is computed from the raw files it is given, the status
rule is the one the page states, the render-only path runs nothing, and the committed page is the render of
the committed raw results."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import crosscheck  # noqa: E402
import crosscheck_summary as summary  # noqa: E402


def _write(path, content) -> None:
    with open(path, "w") as f:
        json.dump(content, f)


def test_versus_states_met_noise_missed_and_untested():
    assert summary.versus([70.0, 72.0], [70.0, 71.0]) == "met (+0.5)"
    # Below by 1 with a standard error of the difference of 1: within 2 standard errors.
    assert summary.versus([69.0, 71.0, 70.0], [71.0, 72.0, 70.0]).startswith("within seed noise (-1.0)")
    assert summary.versus([60.0, 60.2], [70.0, 70.2]) == "missed (-10.0)"
    assert summary.versus([60.0], [70.0, 71.0]) == "untested (one seed)"


def test_xder_row_is_computed_from_the_raw_files_given(tmp_path):
    seeds = {"0": (70.0, 68.0), "1": (72.0, 66.0)}  # (Synapse, mammoth) final Class-IL
    _write(
        tmp_path / "sidebyside_xder_b500.json",
        {
            "mode": "accuracy",
            "synapse_revision": "2024",
            "values_name": "mammoth",
            "buffer": 500,
            "seeds": {s: {"synapse": {"final": a}, "reference": {"final": b}} for s, (a, b) in seeds.items()},
        },
    )
    steps = [{"relative_grad_diff": 1e-7}, {"relative_grad_diff": 3e-7}]
    _write(
        tmp_path / "sidebyside_xder_steps_rev2024.json",
        {"mode": "steps", "synapse_revision": "2024", "seeds": {"0": {"first_difference": None, "steps": steps}}},
    )
    row = summary.xder_row(str(tmp_path))
    assert row.synapse == "buffer 500: 71.0 ± 1.4 (2)"
    assert row.authors == "buffer 500: 67.0 ± 1.4 (2)"
    assert row.status == "level with the authors' code: buffer 500: met (+4.0)"
    assert row.finding == "revision 2024: 2 lockstep steps, none differs (worst gradient 3.0e-07)"
    assert len(row.sources) == 2 and all(p.endswith(".json") for p in row.sources)


def test_gem_row_names_where_each_code_collapses(tmp_path):
    def run(gamma, seed, ours, theirs):
        side = lambda trained: {"final_average": trained[-1], "just_trained": trained}  # noqa: E731
        return {"gamma": gamma, "seed": seed, "synapse": side(ours), "reference": side(theirs)}

    _write(
        tmp_path / "sidebyside_gem_a.json",
        {"runs": [run(0.5, 0, [0.8, 0.8, 0.3], [0.8, 0.8, 0.7]), run(0.0, 0, [0.8, 0.8, 0.8], [0.8, 0.7, 0.8])]},
    )
    row = summary.gem_row(str(tmp_path), summary.NO_CHECKS)
    assert row.synapse == "margin 0.5: 30.0 (1); margin 0: 80.0 (1)"
    assert "margin 0.5: Synapse from task 3, authors' code never" in row.finding
    assert row.status.startswith("not explained by the margin alone")  # the authors' code did not collapse


def test_a_missing_raw_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sidebyside_xder_"):
        summary.xder_row(str(tmp_path))


def test_render_only_runs_nothing_and_refuses_missing_runs(tmp_path):
    out = tmp_path / "page.md"
    cache = tmp_path / "empty.jsonl"
    cache.write_text("")
    for argv in (["--render-only"], ["--render-only", "--cache", str(cache)]):
        with pytest.raises(SystemExit) as stop:
            crosscheck.main([*argv, "--checks", "mir-200", "--output", str(out)])
        assert stop.value.code == 2
    assert not out.exists()


def test_the_committed_page_is_the_render_of_the_committed_raw_results(tmp_path):
    with open(os.path.join(ROOT, "REPRODUCIBILITY-crosscheck.md")) as f:
        page = f.read()
    # The page's own command (its checks and seeds), rendered from the committed cache.
    command = next(line for line in page.splitlines() if line.startswith("- Command: "))
    argv = command.split("`")[1].split()[2:]
    out = tmp_path / "page.md"
    cache = os.path.join(ROOT, "benchmarks", "results", "crosscheck_runs.jsonl")
    assert crosscheck.main([*argv, "--render-only", "--cache", cache, "--output", str(out)]) == 0
    assert out.read_text() == page


def test_derpp_stream_row_reads_mammoths_runs_and_pairs_them_with_the_plain_loop(tmp_path):
    def run(final, diverged=False):
        return {"final": final, "diverged": diverged}

    seeds = {
        "0": {"synapse": run(20.0), "reference": run(10.0, True)},
        "1": {"synapse": run(30.0), "reference": run(41.0)},
    }
    _write(tmp_path / "sidebyside_derpp360.json", {"mode": "accuracy", "seeds": seeds})
    trace = {"row": {"seed": 1}, "events": {"non_finite": None}, "window": [{"weight_max": 3.0}]}
    _write(tmp_path / "diverge_trace_derpp_360_b500_s1.json", trace)
    checks = summary.Checks([20.0, 30.0], [10.0, 40.0], lambda v: v < 11.2, None, None, [0, 1])
    row = summary.derpp_stream_row(str(tmp_path), checks)
    assert row.authors.startswith("mammoth `Derpp`, 25.5 over 2 seeds, 1 diverged. For context, a plain")
    assert row.finding.startswith("mammoth's final accuracy equals the plain loop's on 1 of 2 seeds")
    assert row.status.startswith("level with the authors' code, all seeds: within seed noise (-0.5)")
    assert any(p.endswith("sidebyside_derpp360.json") for p in row.sources)
