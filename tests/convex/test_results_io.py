"""Results on disk on their own (amalab/convex/results_io.py): the CSVs hold the record's numbers row by row,
results.json reads back as written, the strict reader names the first thing wrong, the comparison with
committed results counts changed, new and gone rows at its tolerance, and the output folder's lock.

Independent references: a small hand-written record and the CSV rows written out by hand from it; the
comparison's counts come from edits made here to a copy of the files.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest

from amalab.convex.results_io import compare_results, load_results, locked_output_folder, write_results
from amalab.errors import ConfigError

CHECKS = {"slope_horizons": 2, "slope_gate": -0.45, "duality_slope_gate": -0.45, "gap_tolerance": 1e-6,
          "exp3_z": 3.0}


def small_record() -> dict:
    """Two rate horizons (a stochastic algorithm with 2 seeds, a deterministic one with its duality gaps),
    two tasks of worst-task results over 2 seeds, one EXP3 sequence at two horizons."""
    return {
        "config": {"seed": 0, "out": "runs/a", "compare_with": "", "workers": 2, "checks": dict(CHECKS)},
        "rates": {"dpo": {"horizons": [256, 512], "opt": 0.0905, "algorithms": {
            "ama-r": {"gap": [[0.02, 0.03], [0.01, 0.015]], "median": [0.025, 0.0125],
                      "q25": [0.0225, 0.01125], "q75": [0.0275, 0.01375], "bound": [0.5, 0.35],
                      "slope": -1.0, "slope_se": 0.1},
            "ama-r-full": {"gap": [[0.003], [0.0015]], "median": [0.003, 0.0015], "q25": [0.003, 0.0015],
                           "q75": [0.003, 0.0015], "bound": [0.13, 0.095], "slope": -1.0, "slope_se": 0.0,
                           "duality_gap": [0.004, 0.002], "duality_slope": -1.0},
        }}},
        "worst_task": {"task_names": ["big", "small"], "opt": 0.1, "horizon": 64, "algorithms": {
            "standard": {"task_excess": [[0.01, 0.2], [0.02, 0.19]],
                         "average_weights": [[0.9, 0.1], [0.9, 0.1]],
                         "curve_steps": [16, 64], "curve": [[0.3, 0.2], [0.31, 0.19]]},
        }},
        "exp3": {"k": 5, "sequences": {"bernoulli": {"horizons": [256, 1024], "gamma": [0.135, 0.0676],
                                                     "mean_regret": [37.2, 109.5], "stderr": [0.59, 1.43],
                                                     "bound": [101.1, 202.4]}}},
    }


RATES_ROWS = [
    ["loss", "algorithm", "T", "seed", "gap", "bound", "opt"],
    ["dpo", "ama-r", "256", "0", "2.000000e-02", "5.000000e-01", "9.050000000e-02"],
    ["dpo", "ama-r", "256", "1", "3.000000e-02", "5.000000e-01", "9.050000000e-02"],
    ["dpo", "ama-r", "512", "0", "1.000000e-02", "3.500000e-01", "9.050000000e-02"],
    ["dpo", "ama-r", "512", "1", "1.500000e-02", "3.500000e-01", "9.050000000e-02"],
    ["dpo", "ama-r-full", "256", "0", "3.000000e-03", "1.300000e-01", "9.050000000e-02"],
    ["dpo", "ama-r-full", "512", "0", "1.500000e-03", "9.500000e-02", "9.050000000e-02"],
]
WORST_TASK_ROWS = [
    ["algorithm", "seed", "E_0", "E_1", "worst", "opt"],
    ["standard", "0", "1.000000e-02", "2.000000e-01", "2.000000e-01", "1.000000e-01"],
    ["standard", "1", "2.000000e-02", "1.900000e-01", "1.900000e-01", "1.000000e-01"],
]
EXP3_ROWS = [
    ["sequence", "T", "gamma", "mean_regret", "stderr", "bound"],
    ["bernoulli", "256", "0.135", "37.2", "0.59", "101.1"],
    ["bernoulli", "1024", "0.0676", "109.5", "1.43", "202.4"],
]


def read_rows(path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def write_rows(path, rows) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_the_csvs_hold_the_records_numbers_and_results_json_reads_back(tmp_path):
    record = small_record()
    paths = write_results(record, tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "rates.csv", "worst_task.csv", "exp3.csv"]
    assert read_rows(paths[1]) == RATES_ROWS
    assert read_rows(paths[2]) == WORST_TASK_ROWS
    assert read_rows(paths[3]) == EXP3_ROWS
    assert json.loads(paths[0].read_text()) == record == load_results(paths[0])


def _set(path: str, value):
    def edit(record):
        *parents, last = path.split("/")
        node = record
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
        return record
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit, message", [
    (lambda r: [r], "expected a JSON object"),
    (_set("config/checks/exp3_z", True), "config.checks.exp3_z: expected a number, got True"),
    (_set("config/checks/slope_horizons", 3),
     "rates.dpo.horizons: 2 horizons, fewer than slope_horizons = 3"),
    (_set("rates/dpo/algorithms/ama-r/gap", [[0.02, 0.03]]),
     "rates.dpo.algorithms.ama-r.gap: expected shape (2, 'any'), got (1, 2)"),
    (_set("rates/dpo/algorithms/ama-r/median", [0.025]),
     "rates.dpo.algorithms.ama-r.median: expected shape (2,), got (1,)"),
    (_set("rates/dpo/algorithms/ama-r-full/duality_gap", ["a", "b"]),
     "rates.dpo.algorithms.ama-r-full.duality_gap: expected numbers, got ['a', 'b']"),
    (_set("rates/dpo/algorithms/ama-r-full/duality_slope", _DELETE),
     "rates.dpo.algorithms.ama-r-full: missing field 'duality_slope'"),
    (_set("worst_task/algorithms/standard/average_weights", [[0.9, 0.1]]),
     "worst_task.algorithms.standard.average_weights: expected shape (2, 2), got (1, 2)"),
    (_set("worst_task/algorithms/standard/curve", [[0.3], [0.31]]),
     "worst_task.algorithms.standard.curve: expected shape (2, 2), got (2, 1)"),
    (_set("exp3/sequences/bernoulli/stderr", [0.59, float("inf")]),
     "exp3.sequences.bernoulli.stderr: contains a non-finite value (NaN or infinity)"),
    (_set("exp3/sequences", {}), "exp3.sequences: expected a non-empty table"),
    (_set("worst_task", 3), "worst_task: expected a table, got int"),
])
def test_the_reader_names_the_first_thing_wrong_in_one_line(tmp_path, edit, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(edit(small_record()), allow_nan=True))
    with pytest.raises(ConfigError) as raised:
        load_results(path)
    assert str(raised.value) == f"{path}: not a valid convex-rates results file: {message}"


def test_a_missing_results_file_says_what_to_run(tmp_path):
    with pytest.raises(ConfigError, match=r"no such results file \(run `amalab convex-rates CONFIG` first\)"):
        load_results(tmp_path / "results.json")


@pytest.fixture
def two_runs(tmp_path):
    """The same record written twice: ``new`` (a fresh run) and ``committed``."""
    new, committed = tmp_path / "new", tmp_path / "committed"
    write_results(small_record(), new)
    write_results(small_record(), committed)
    return new, committed


def test_identical_runs_match_csv_by_csv(two_runs):
    new, committed = two_runs
    assert compare_results(new, committed) == [
        "same config as the committed run",
        "rates.csv: matches (6 rows, relative tolerance 1e-06)",
        "worst_task.csv: matches (2 rows, relative tolerance 1e-06)",
        "exp3.csv: matches (2 rows, relative tolerance 1e-06)",
    ]


def test_a_cell_counts_as_changed_only_beyond_the_relative_tolerance(two_runs):
    new, committed = two_runs
    rows = copy.deepcopy(RATES_ROWS)
    rows[1][4] = "2.0000001e-02"  # 5e-8 relative: within 1e-6
    write_rows(committed / "rates.csv", rows)
    assert compare_results(new, committed)[1] == "rates.csv: matches (6 rows, relative tolerance 1e-06)"
    rows[1][4] = "2.00001e-02"  # 5e-6 relative: beyond it
    rows[6][6] = "9.05e-02"  # the same number written differently: equal
    write_rows(committed / "rates.csv", rows)
    assert compare_results(new, committed)[1] == \
        "rates.csv: DIFFERS: 1 rows changed, 0 new, 0 gone (of 6 committed)"
    assert compare_results(new, committed, rtol=1e-4)[1] == \
        "rates.csv: matches (6 rows, relative tolerance 0.0001)"


def test_new_gone_and_renamed_columns_are_told_apart(two_runs):
    new, committed = two_runs
    write_rows(committed / "rates.csv", RATES_ROWS[:3] + RATES_ROWS[4:])  # (dpo, ama-r, 512, 0) not committed
    extra = ["standard", "2", "1.000000e-02", "2.000000e-01", "2.000000e-01", "1.000000e-01"]
    write_rows(committed / "worst_task.csv", WORST_TASK_ROWS + [extra])  # a committed seed the new run lacks
    renamed = [["sequence", "T", "gamma", "regret", "stderr", "bound"]]
    write_rows(committed / "exp3.csv", renamed + EXP3_ROWS[1:])
    lines = compare_results(new, committed)
    assert lines[1:] == [
        "rates.csv: DIFFERS: 0 rows changed, 1 new, 0 gone (of 5 committed)",
        "worst_task.csv: DIFFERS: 0 rows changed, 0 new, 1 gone (of 3 committed)",
        "exp3.csv: DIFFERS: columns changed (sequence, T, gamma, regret, stderr, bound -> "
        "sequence, T, gamma, mean_regret, stderr, bound)",
    ]


def test_the_first_line_names_the_config_tables_that_differ(two_runs):
    new, committed = two_runs
    record = json.loads((committed / "results.json").read_text())
    record["config"].update(seed=1, workers=8, out="elsewhere")  # out and workers do not change the numbers
    record["config"]["checks"]["exp3_z"] = 2.0
    (committed / "results.json").write_text(json.dumps(record))
    (committed / "exp3.csv").unlink()
    lines = compare_results(new, committed)
    assert lines[0] == "configs differ in: checks, seed"
    assert lines[3] == f"exp3.csv: no committed copy in {committed}"
    (committed / "results.json").write_text("{")
    assert compare_results(new, committed)[0] == "configs differ in: (the committed config could not be read)"


def test_the_output_folder_is_created_and_held_by_one_run_at_a_time(tmp_path):
    out = tmp_path / "a" / "b"
    with locked_output_folder(out) as held:
        assert held == out and (out / ".lock").is_file()
        with pytest.raises(ConfigError) as raised:
            with locked_output_folder(out):
                pass
        assert str(raised.value).startswith(f"{out}: another amalab run is writing to this folder")
    with locked_output_folder(out):  # released at the end of the first run
        pass
    shutil.rmtree(out)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write the output folder"):
        with locked_output_folder(blocker / "out"):
            pass
