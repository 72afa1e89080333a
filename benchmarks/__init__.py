"""``python -m benchmarks``: how fast the training step is, and why.

Usage (from the repository root)::

    python -m benchmarks --preset resnet18-cifar --json bench.json
    python -m benchmarks --preset resnet50 --torch          # GPU: bf16 by default
    python -m benchmarks --preset tiny --config.moco.queue_size=128 --config.seed=1
    python -m benchmarks --config configs/fashion_mnist.py --dtype bfloat16

Presets (built from ``configs/``): ``tiny`` (``smoke.py``), ``fashion-mnist``
(``fashion_mnist_reference.py``, the reference recipe's model), ``resnet18-cifar``
(``moco_v2_cifar.py`` at batch 256, 8 BN groups) and ``resnet50`` (``moco_v2_imagenet.py``,
256 images per device, halved until it fits). The preset names the config file unless
``--config`` gives one; ``--config.KEY=VALUE`` sets any config field, as in ``train.py``
(ml_collections' ``config_flags``). ``--dtype auto`` computes in bfloat16 on GPU/TPU and in the
config's dtype (float32) on CPU.

This package is a tool beside the library, not part of it: ``moco_jax`` never imports it (nor
torch, which the ``--torch`` comparisons need).

What is measured (all inputs synthetic and on device; see ``inputs.py``):

- ``variants.step``: the jitted, state-donating training step alone, on fixed pre-augmented views;
  ``variants.step_with_augment``: the trainer's own view pipeline (``ResidentViews``: the epoch's
  index table, the step counter and the keys on device) + the step, as in training. Each:
  ``warmup`` steps, then ``repeats`` x ``steps`` steps, each
  repeat timed to ``block_until_ready``; images/sec median, min, max, spread = (max-min)/median.
  The timed loops run under ``jax.transfer_guard("disallow")`` (no host round-trips inside).
- ``compile``: trace, lower and XLA-compile seconds of the step (``.trace().lower().compile()``),
  and the view function's first call (compile + one run); a persistent compilation cache, if
  configured, shortens them.
- ``memory``: the compiled step's ``memory_analysis()``; ``peak_bytes_estimate`` = argument +
  output - alias + temp bytes per device (see ``compiled.py``); on GPU also the allocator's
  ``peak_bytes_in_use`` after the run.
- ``flops``: XLA's ``cost_analysis()`` FLOPs per step and per image, and model FLOPs per image
  (2 x MACs: 3 x query-encoder forward + 1 x key-encoder forward + logits forward and backward).
  ``mfu`` = model FLOPs x images/sec / (peak x devices), with the dense bf16 peaks of
  ``compiled.PEAK_BF16_FLOPS`` (H100, H200, A100, TPU v4/v5e/v5p/v6e); null where unknown (CPU).
- ``floor``: XLA's floor on this device: every convolution and matmul of the step compiled and
  timed alone, summed (``floor.py`` says exactly how); ``step_over_floor`` = step / floor;
  ``--floor_pairs N`` adds N (floor, step) timings taken back to back and their median ratio.
- ``torch`` (``--torch``): the PyTorch re-statement of the official step
  (``benchmarks/torch_reference.py``; same architecture, per-device batch, K, dim, BN groups;
  channels-last; autocast bf16 when the JAX run is bf16), run first in the same process;
  ``jax_over_torch`` = JAX images/sec per device / PyTorch images/sec (> 1: JAX is faster).
- ``loss_check``: a short run in float32 and bfloat16 from the same start and data, against the
  seed-to-seed noise of float32.
- ``collectives``: bytes moved per step by every collective in the compiled step's HLO on an
  ``--collectives_devices``-device mesh (8; fake CPU devices in a subprocess when this process
  has fewer), by kind and payload; ``shuffle_over_gather`` = Shuffle-BN's all-to-all of images /
  an all-gather of every image (the official code's) = 1/n.
- ``donation``: whether every buffer of the old state was donated (deleted) by a step call.
"""

from benchmarks.presets import PRESETS, Options
from benchmarks.report import format_summary
from benchmarks.runner import run_benchmark

__all__ = ["PRESETS", "Options", "format_summary", "run_benchmark"]
