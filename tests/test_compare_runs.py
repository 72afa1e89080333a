"""``python -m benchmarks.compare_runs``: the table and the plot of several workdirs' kNN."""

import json

from benchmarks import compare_runs


def _workdir(path, knn, baselines):
    path.mkdir()
    rows = [{"epoch": e + 1, "loss": 1.0, "knn_head": h, "knn_backbone": b} for e, (h, b) in knn]
    (path / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "baselines.json").write_text(json.dumps(baselines))


def test_table_and_plot_of_runs_of_different_lengths(tmp_path, capsys):
    base = {"knn_pixels": 78.85, "random_init_knn_head": 60.0, "random_init_knn_backbone": 61.5}
    _workdir(tmp_path / "a", enumerate([(70.0, 71.0), (72.5, 73.25)]), base)
    _workdir(tmp_path / "b", enumerate([(65.0, 66.0)]), base)
    out = tmp_path / "runs.png"
    assert compare_runs.main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| epoch | A | B |",
        "|---|---|---|",
        "| 0 (random init) | 60.00 / 61.50 | 60.00 / 61.50 |",
        "| 1 | 70.00 / 71.00 | 65.00 / 66.00 |",
        "| 2 | 72.50 / 73.25 |  |",
    ]
    assert out.stat().st_size > 0
