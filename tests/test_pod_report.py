"""benchmarks/pod_report.py: the Markdown of docs/pod_readiness.md from --compile_for reports,
including a slice where the TPU compiler refused the training step (out of HBM)."""

import json

from benchmarks import pod_report

GIB = 2**30


def _function(name, gib, **extra):
    entry = {"name": name, "bytes_per_chip": gib * GIB, "hbm_bytes_per_chip": 16 * GIB}
    entry |= {"fits": gib < 16, "alongside_bytes": 0, "collectives": {}}
    return entry | extra


def _refused(name, gib):
    """An entry as compile_for writes it when the compiler refuses the program."""
    return {
        "name": name, "compile_seconds": 30.0, "compile_error": "RESOURCE_EXHAUSTED: ...",
        "bytes_per_chip": gib * GIB, "hbm_bytes_per_chip": 16 * GIB, "flops_per_chip": None,
        "collectives": {}, "collective_bytes_sent_per_chip": 0, "fits": False,
    }  # fmt: skip


def _report(topology, chips, step):
    return {
        "topology": topology, "chips": chips, "hosts": chips // 4, "global_batch": 512 * chips,
        "hbm_bytes_per_chip": 16 * GIB,
        "model": {"dtype": "bfloat16"}, "functions": [step, _function("knn features", 1.5)],
    }  # fmt: skip


def test_a_refused_step_is_a_row_with_its_total_and_the_largest_batch(tmp_path):
    compiled = _function(
        "train_step", 15.25, argument_bytes=GIB, temp_bytes=14 * GIB, flops_per_chip=4.2e13,
        bound_images_per_sec_per_chip=2364.4,
        collectives={"all-gather": {"count": 2, "moved_bytes": 3.5 * 2**20}},
    )  # fmt: skip
    refused = _refused("train_step", 33.5)
    refused_report = _report("v5e:2x4", 8, refused)
    refused_report["training_step_batch"] = {
        "largest_per_chip_batch": 256, "bytes_per_chip_by_batch": {"256": 15.67 * GIB},
    }  # fmt: skip
    (tmp_path / "small_bfloat16_v5e:2x4.json").write_text(
        json.dumps(_report("v5e:2x4", 8, compiled))
    )
    (tmp_path / "big_bfloat16_v5e:2x4.json").write_text(json.dumps(refused_report))
    text = pod_report.render(pod_report.load(str(tmp_path)))
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 33.50 / 16 ✗ | 256 (256: 15.67 GiB) | - | - | - | - | - |" in rows["big"]
    assert "| 1.00 | 14.00 | 15.25 / 16 | - | 0 | 0 | 3.5 | 42000 | ≤ 2364 |" in rows["small"]
    assert "| train_step | 33.50 ✗ |" in text and "| knn features | 1.50 |" in text
    assert "From 8 chips" not in text  # no 16- or 256-chip slice to scale to


def test_a_refused_slice_has_no_figures_in_the_scaling_table(tmp_path):
    """8 chips compiled, 16 refused: the 16-chip cells are "-", not a 0 that reads as scaling."""
    knn = "knn accuracy (head)"
    for topology, chips, step, accuracy in [
        ("v5e:2x4", 8, _function("train_step", 15.0, collective_bytes_sent_per_chip=100 * 2**20),
         _function(knn, 1.0, collective_bytes_sent_per_chip=2**20)),
        ("v5e:4x4", 16, _refused("train_step", 20.0), _refused(knn, 17.0)),
    ]:  # fmt: skip
        report = _report(topology, chips, step)
        report["functions"].append(accuracy)
        (tmp_path / f"big_bfloat16_{topology}.json").write_text(json.dumps(report))
    scaling = pod_report.scaling_table(pod_report.load(str(tmp_path)))
    rows = {line.split(" | ")[0][2:]: line for line in scaling if line.startswith("| ")}
    assert rows["train_step: collective bytes sent"].endswith("| 100.0 | - |")
    assert rows[f"{knn}: without alongside"].endswith("| 1024.0 | - |")
    assert rows[f"{knn}: total"].endswith("| 1024.0 | - |")
