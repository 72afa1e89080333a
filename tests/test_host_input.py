"""The host-input benchmark's command line and arithmetic (nothing timed here)."""

import pytest

from benchmarks import host_input


def test_the_bound_is_read_from_the_compile_report():
    """MoCo v2 R-50 bf16 on v5e: the images/sec/chip column of docs/pod_readiness.md."""
    bound = host_input.compile_report_bound()
    assert 5000 < bound < 7000
    chips = host_input.cores_per_chip(per_core=100.0, per_cpu_sec=200.0, bound=bound)
    assert chips["vcpus_per_chip_at_bound"] == pytest.approx(bound / 100)
    assert chips["vcpus_per_chip_at_40_percent_by_cpu_time"] == pytest.approx(0.4 * bound / 200)


def test_a_missing_folder_is_one_error_line(capsys):
    assert host_input.main(["--cores", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: give --folder")


def test_the_summary_names_both_resize_modes():
    """``--resize device`` (the default): "ours" is the device-resize mode, the host mode is
    timed beside it; the ratio is ours over the official."""
    values = host_input.parse_args(["--folder", "/tmp/unused"])
    assert values.resize == "device"
    report = {"cores": 2, "images_per_run": 768, "resize": "device", "ratio": 2.0}
    report |= {"ours": 800.0, "ours_per_cpu_sec": 420.0, "official": 400.0}
    report |= {"official_per_cpu_sec": 210.0, "ratio_cpu": 2.0}
    report |= {"ours_other_resize": 300.0, "ours_other_resize_per_cpu_sec": 160.0}
    report["chips"] = host_input.cores_per_chip(400.0, 420.0, 6000.0)
    lines = host_input.summary(report).splitlines()
    assert any(line.split()[:4] == ["ours", "(device", "resize)", "800.0"] for line in lines)
    assert any(line.split()[:4] == ["ours", "(host", "resize)", "300.0"] for line in lines)
    assert "2.00 (ours / official" in host_input.summary(report)
