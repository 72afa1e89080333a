"""The few human-readable lines printed after a step benchmark (the JSON report has the rest)."""

from __future__ import annotations

from typing import Any


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of a report."""
    lines = [
        f"{report['preset'] or report['config_path']}: {report['model']['backbone']} "
        f"{report['dtype']}, batch {report['global_batch']} on {report['num_devices']} x "
        f"{report['device_kind']}",
        f"compile {report['compile']['step_compile_s']:.1f}s, peak memory estimate "
        f"{(report['memory']['peak_bytes_estimate'] or 0) / 2**20:.1f} MiB/device, "
        f"model GFLOP/image {report['flops']['model_flops_per_image'] / 1e9:.3f}",
    ]
    for name, v in report["variants"].items():
        ips = v["images_per_sec"]
        mfu = f", MFU {100 * v['mfu']:.1f}%" if v["mfu"] is not None else ""
        lines.append(
            f"{name}: {ips['median']:.1f} images/sec (min {ips['min']:.1f}, max "
            f"{ips['max']:.1f}){mfu}"
        )
    if report["floor"]:
        f = report["floor"]
        lines.append(
            f"XLA floor (convs + matmuls alone): {f['floor_ms']:.2f} ms; step "
            f"{f['step_ms']:.2f} ms = {f['step_over_floor']:.2f}x floor"
        )
        if f.get("pairs"):
            ratios = ", ".join(f"{p['step_over_floor']:.2f}" for p in f["pairs"])
            lines.append(
                f"  (floor, step) pairs back to back: {ratios}; median "
                f"{f['step_over_floor_median']:.2f}x"
            )
    t = report.get("torch")
    if t and "jax_over_torch" in t:
        lines.append(
            f"PyTorch ({t['device']}): {t['images_per_sec']['median']:.1f} images/sec; "
            f"JAX / PyTorch = {t['jax_over_torch']:.2f}"
        )
    if report["loss_check"]:
        lc = report["loss_check"]
        lines.append(
            f"loss after {lc['steps']} steps: fp32 {lc['float32'][-1]:.4f}, bf16 "
            f"{lc['bfloat16'][-1]:.4f} (|diff| {lc['bf16_vs_fp32_max_abs_diff']:.4f}, seed noise "
            f"{lc['fp32_seed_max_abs_diff']:.4f})"
        )
    c = report["collectives"]
    if c:
        lines.append(
            f"collectives on {c['num_devices']} devices: {c['total_moved_bytes'] / 2**20:.2f} "
            f"MiB sent/device/step; Shuffle-BN images {c['shuffle_images_all_to_all_bytes']} B "
            f"vs gather-all {c['gather_all_images_bytes']} B ({c['shuffle_over_gather']:.4f})"
        )
    return "\n".join(lines)
