"""Presets and the options of a step benchmark, resolved into the config it runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The lr schedule is per epoch; a long epoch keeps it at its peak for every benchmarked step.
STEPS_PER_EPOCH = 1_000_000


@dataclasses.dataclass(frozen=True)
class Preset:
    """A config from ``configs/`` plus the benchmark's batch and default run lengths."""

    config_module: str
    global_batch: int | None = None  # None: keep the config's
    per_device_batch: int | None = None  # global batch = this x devices
    bn_groups: int | None = None  # BN groups per device (bn_group_size = per-device batch / it)
    steps: int = 10
    repeats: int = 5
    warmup: int = 3
    loss_steps: int = 20

    @property
    def config_file(self) -> str:
        return str(REPO_ROOT / "configs" / f"{self.config_module}.py")


PRESETS = {
    "tiny": Preset("smoke", steps=2, repeats=3, warmup=1, loss_steps=3),
    "fashion-mnist": Preset("fashion_mnist_reference"),
    "resnet18-cifar": Preset("moco_v2_cifar", global_batch=256, bn_groups=8),
    "resnet50": Preset("moco_v2_imagenet", per_device_batch=256, loss_steps=10),
}


@dataclasses.dataclass
class Options:
    """Everything the command line sets; ``None`` run lengths come from the preset.

    The config is ``config`` if given (the command line's ``--config`` flag: the preset's file or
    ``config_path``, overrides applied), else ``config_path``'s ``get_config()``, else the
    preset's; ``overrides`` (dotted field -> value) are set on top of it. A field they set keeps
    that value where the preset would change it (``batch_size``, ``model.bn_group_size``,
    ``model.dtype``); with ``config_path`` the config's own batch is kept too.
    """

    preset: str = "resnet18-cifar"
    config_path: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config: ml_collections.ConfigDict | None = None
    num_devices: int = 0
    dtype: str = "auto"
    steps: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    loss_steps: int | None = None
    torch: bool = False
    floor: bool = True
    floor_pairs: int = 0  # extra (floor, step) pairs taken back to back
    collectives: bool = True
    collectives_devices: int = 8
    fit_batch: bool = True
    torch_threads: int = 0  # 0: PyTorch's default
    seed: int = 0


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as ``configs/moco_v2_cifar.py``."""
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    if spec is None or spec.loader is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set dotted fields with ConfigDict's own ``update_from_flattened_dict`` (type-checked);
    an unknown field or a value of the wrong type is a ``ValueError`` naming the field."""
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError):
            raise ValueError(f"override {key!r}: no config field {key!r}") from None
        except TypeError as err:
            raise ValueError(f"override {key!r}: {err}") from None


def resolve_config(options: Options) -> tuple[ml_collections.ConfigDict, Preset]:
    """The run's config: preset (or file), overrides, then the benchmark's batch and dtype."""
    preset = PRESETS[options.preset]
    if options.config_path:  # the file's batch and BN groups are kept
        preset = dataclasses.replace(
            preset, global_batch=None, per_device_batch=None, bn_groups=None
        )
    config = options.config
    if config is None:
        config = load_config_file(options.config_path or preset.config_file)
    config = config.copy_and_resolve_references()
    config.lock()  # an override must name a field the config has
    apply_overrides(config, options.overrides)
    overridden = set(options.overrides)

    num_devices = options.num_devices or config.num_devices or jax.device_count()
    config.num_devices = num_devices
    if "batch_size" not in overridden:
        if preset.per_device_batch:
            config.batch_size = preset.per_device_batch * num_devices
        elif preset.global_batch:
            config.batch_size = preset.global_batch
    if preset.bn_groups and "model.bn_group_size" not in overridden:
        config.model.bn_group_size = config.batch_size // num_devices // preset.bn_groups
    if options.dtype != "auto":
        config.model.dtype = options.dtype
    elif "model.dtype" not in overridden and jax.default_backend() != "cpu":
        config.model.dtype = "bfloat16"  # accelerators: bf16 compute, fp32 parameters
    return config, preset
