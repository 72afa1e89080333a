"""``python -m benchmarks.seeds``: the mean ± std table (checked against a hand computation) and
which seeds count as finished (a rerun skips them, resumes the others)."""

import json
import math

from benchmarks.seeds import _finished, table


def test_the_table_gives_mean_and_sample_std_per_figure():
    per_seed = {
        0: {"kNN head": 80.0, "kNN backbone": 79.0, "linear top-1": 84.0},
        1: {"kNN head": 82.0, "kNN backbone": 81.0},
        2: {"kNN head": 81.0, "kNN backbone": 80.5, "linear top-1": 85.0},
    }
    markdown, result = table(per_seed)
    head = result["figures"]["kNN head"]
    assert head["mean"] == 81.0 and math.isclose(head["std"], 1.0)  # sqrt(((-1)^2+1^2+0)/2)
    linear = result["figures"]["linear top-1"]
    assert linear["values"] == [84.0, 85.0] and math.isclose(linear["std"], math.sqrt(0.5))
    lines = markdown.splitlines()
    assert lines[0] == "| figure | mean ± std | seed 0 | seed 1 | seed 2 |"
    assert lines[2] == "| kNN head | 81.00 ± 1.00 | 80.00 | 82.00 | 81.00 |"
    assert lines[4] == "| linear top-1 | 84.50 ± 0.71 | 84.00 | - | 85.00 |"


def test_a_seed_is_finished_when_its_summary_reached_the_last_epoch(tmp_path):
    assert not _finished(tmp_path)  # nothing yet
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 5}))
    (tmp_path / "summary.json").write_text(json.dumps({"final_epoch": 3}))
    assert not _finished(tmp_path)  # an earlier, shorter run: resume it
    (tmp_path / "summary.json").write_text(json.dumps({"final_epoch": 5}))
    assert _finished(tmp_path)
