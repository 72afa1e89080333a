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
