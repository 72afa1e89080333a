"""What Shuffle-BN does on a given number of devices, the rules it puts on the batch, and the
queue's size against the batch.

Shuffle-BN exists so that a key's BatchNorm statistics come from another random set of images
than its query's (He et al. 2020, sec. 3.3): otherwise the two views of an image share batch
statistics and the model can cheat the pretext task with them.

- Across devices (``algorithms.shuffle_bn``): keys are exchanged within groups of
  ``model.shuffle_group_devices`` devices (default 8: the official 8-GPU setup, where a key's BN
  batch holds 1/8 of its own GPU's images; 0: all devices). Fewer devices than that form one
  group. The all-to-all sends ``1/g`` of each device's batch to each device of the group, so the
  per-device batch must be a multiple of ``g``: any global batch that the devices divide runs,
  e.g. 4096 on 256 chips (16 per chip), where one group of all devices needed 65,536.
- Within one device (one device, or groups of one): nothing crosses a device, so the keys' BN
  would see their own query batch. As the official CIFAR-10 colab does on its one GPU
  (``--bn-splits 8``), BatchNorm then runs in 8 groups of the shuffled batch unless
  ``model.bn_group_size`` says otherwise; a batch that 8 groups of >= 2 cannot split is refused.

- The queue: K must be at least one step of keys (validation refuses less); under 4 steps a
  pretraining run warns once (``queue_warnings``, said by ``run.trainer``), e.g. batch 65536 with
  the default K = 65536: the negatives would be little more than the last step's keys.

Pure functions of the config: the step (``algorithms.moco``) and validation read the same ones.
"""

from __future__ import annotations

from typing import Any

from moco_jax.config.checks import check_int_at_least, require

ONE_DEVICE_BN_SPLITS = 8  # the official colab's --bn-splits
QUEUE_STEPS_WARNED = 4  # fewer steps' keys than this in the queue: a warning


def shuffle_group(model: Any, num_devices: int) -> int:
    """Devices per Shuffle-BN group on ``num_devices``: ``model.shuffle_group_devices`` (0: all
    of them), at most ``num_devices``."""
    group = model.shuffle_group_devices
    return num_devices if group == 0 else min(group, num_devices)


def key_bn_group_size(model: Any, per_device: int, num_devices: int) -> int:
    """``model.bn_group_size`` the encoder is built with: the config's, or, with ``shuffle`` BN
    whose keys never leave their device, ``per_device / 8`` (``ONE_DEVICE_BN_SPLITS`` groups)."""
    if model.bn_group_size or model.bn_mode != "shuffle":
        return model.bn_group_size
    if shuffle_group(model, num_devices) > 1:
        return 0
    return per_device // ONE_DEVICE_BN_SPLITS


def check_shuffle_bn(model: Any, batch_size: int, num_devices: int) -> None:
    """``ConfigError`` for a batch that Shuffle-BN cannot split on ``num_devices``."""
    check_int_at_least("model.shuffle_group_devices", model.shuffle_group_devices, 0)
    if model.bn_mode != "shuffle":
        return
    per_device = batch_size // num_devices
    group = shuffle_group(model, num_devices)
    require(
        num_devices % group == 0,
        f"model.shuffle_group_devices {group} does not divide the {num_devices} devices: "
        f"set it to a divisor of {num_devices} (0: all devices)",
    )
    require(
        per_device % group == 0,
        f"bn_mode 'shuffle' sends 1/{group} of each device's batch to every device of its group "
        f"of {group} (model.shuffle_group_devices): the per-device batch ({per_device}) must be "
        f"divisible by {group}",
    )
    splits = ONE_DEVICE_BN_SPLITS
    require(
        group > 1 or model.bn_group_size or per_device % (2 * splits) == 0,
        f"bn_mode 'shuffle' on one device (or model.shuffle_group_devices 1) runs the keys' "
        f"BatchNorm in {splits} groups, as the official colab's --bn-splits {splits}: the "
        f"per-device batch ({per_device}) must be a multiple of {2 * splits}; or set "
        f"model.bn_group_size (images per BN group), or bn_mode 'local' to train without "
        f"Shuffle-BN",
    )


def queue_warnings(config: Any) -> list[str]:
    """Why this queue is short for MoCo (K should hold several steps of keys), if it is."""
    if config.algorithm != "moco":
        return []
    enqueued = config.batch_size * (2 if config.moco.symmetric else 1)
    steps = config.moco.queue_size / enqueued
    if steps >= QUEUE_STEPS_WARNED:
        return []
    return [
        f"moco.queue_size (K={config.moco.queue_size}) is {steps:.3g}x the {enqueued} keys a "
        f"step enqueues: under {QUEUE_STEPS_WARNED}x, the negatives are mostly the last few "
        f"steps' keys; MoCo's K is many times the batch (65536 for 256)"
    ]
