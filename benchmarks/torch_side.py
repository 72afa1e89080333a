"""The same step in PyTorch (``benchmarks.torch_reference``), timed the same way. Needs torch.

Same architecture, per-device batch, K, dim, BN groups (``SplitBatchNorm``) and SGD as the JAX
run; channels-last memory format; ``torch.autocast`` in bfloat16 when the JAX run computes in
bfloat16 (on GPU the benchmark's default). Inputs are pre-made float views on the device, as in
the JAX ``step`` variant. The official step synchronises with the host every iteration
(``int(queue_ptr)`` in the enqueue, ``loss.item()`` for the meters); so does this one.
"""

from __future__ import annotations

import time
from typing import Any


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def time_torch_step(
    config: Any,
    per_device_batch: int,
    steps: int,
    repeats: int,
    warmup: int,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds per step of the PyTorch re-statement, one device; returns raw samples and setup.

    ``threads`` > 0 sets ``torch.set_num_threads`` (CPU); 0 keeps PyTorch's default.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    result = _measure(torch, config, per_device_batch, steps, repeats, warmup, seed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the model and batches are gone: hand their memory back
    return result


def _measure(torch, config, per_device_batch, steps, repeats, warmup, seed) -> dict[str, Any]:
    from benchmarks.torch_reference import build_for_training, train_step
    from moco_jax.optim import scaled_learning_rate

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels_last = torch.channels_last
    lr = scaled_learning_rate(config.optim, per_device_batch)
    model, optimizer, criterion, num_splits = build_for_training(
        config, per_device_batch, lr, device
    )
    size, channels = config.dataset.image_size, config.dataset.num_channels
    shape = (per_device_batch, channels, size, size)
    im_q = torch.randn(shape, device=device).contiguous(memory_format=channels_last)
    im_k = torch.randn(shape, device=device).contiguous(memory_format=channels_last)
    autocast = torch.bfloat16 if config.model.dtype == "bfloat16" else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step() -> float:
        idx_shuffle = torch.randperm(per_device_batch, device=device)
        return train_step(model, optimizer, criterion, im_q, im_k, idx_shuffle, lr, autocast)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        one_step()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            loss = one_step()
        sync()
        samples.append((time.perf_counter() - start) / steps)
    result = {
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "channels_last": True,
        "autocast_dtype": "bfloat16" if autocast else None,
        "bn_splits": num_splits,
        "batch": per_device_batch,
        "final_loss": loss,
        "peak_memory_bytes": (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        ),
        "samples_s": samples,
    }
    return result
