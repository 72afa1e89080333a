"""Every jitted function a run calls, with the shapes and shardings of its real arguments.

``run_targets(config, devices)`` builds the run as ``train.py`` (or ``evaluate linear``) would on
``devices`` (a TPU topology's compile-only devices: no chips, no dataset) and returns each
function with abstract arguments, ready for ``fn.lower(*args).compile()``. Shapes follow the
data loaders' rules: each host reads ``1/hosts`` of a split (remainder dropped; see ``per_host``
for ``dataset.max_*_examples``); resident datasets are split evenly over a host's devices (the
test split padded), streamed ones come in batches of ``batch_size / hosts`` per host (the last
evaluation batch padded).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moco_jax.assemble import Setup, build, mesh_for
from moco_jax.config.checks import ConfigError
from moco_jax.data.host_crops import resizes_on_device
from moco_jax.data.resident import EPOCH_TABLE_SPEC, make_view_fn
from moco_jax.data.streaming import make_crop_augment_fn
from moco_jax.data.tfds_source import RESIDENT_DATASETS, get_builder
from moco_jax.evaluation.monitor import KnnMonitor
from moco_jax.mesh import DATA_AXIS

# Examples per split of the datasets this project runs, for compiling without the data (TFDS
# catalog: tensorflow.org/datasets/catalog/<name>). A prepared dataset's own metadata wins.
KNOWN_SPLIT_SIZES = {
    "imagenet2012": {"train": 1_281_167, "validation": 50_000},
    "imagenette": {"train": 9_469, "validation": 3_925},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
}


@dataclasses.dataclass
class Target:
    """One jitted function of the run and abstract arguments of the shapes it is called with."""

    name: str
    fn: Any  # jitted
    args: tuple
    # Bytes per device that stay allocated while it runs without being its arguments (the
    # training state during evaluation, the resident dataset, the other kNN feature column).
    alongside: dict[str, int] = dataclasses.field(default_factory=dict)
    images_per_call: int = 0  # images per device per call (the step: its per-device batch)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Examples of the training and evaluation splits, this dataset's label count and the shape
    of its stored images (None: streamed, decoded to the crop size on the host)."""

    train: int
    test: int
    num_classes: int
    stored_shape: tuple[int, ...] | None


def dataset_sizes(config: Any) -> Sizes:
    """Split sizes from the prepared dataset's metadata, else ``KNOWN_SPLIT_SIZES``."""
    dataset = config.dataset
    builder = get_builder(dataset.name, dataset.data_dir)
    features = builder.info.features
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    if not counts:
        counts = KNOWN_SPLIT_SIZES.get(dataset.name.split("/")[0], {})
    test_split = "validation" if "validation" in counts else "test"
    if "train" not in counts or test_split not in counts:
        raise ConfigError(
            f"the split sizes of {dataset.name} are unknown here (not prepared in "
            f"{builder.data_dir_root}): prepare it, or compile a config of "
            f"{', '.join(KNOWN_SPLIT_SIZES)}"
        )
    resident = dataset.name in RESIDENT_DATASETS
    stored = tuple(features["image"].shape) if resident else None
    return Sizes(counts["train"], counts[test_split], features["label"].num_classes, stored)


def per_host(count: int, hosts: int, limit: int, resident: bool) -> int:
    """Examples one host reads of a split (as ``load_arrays`` / ``eval_batches`` do): resident,
    its ``1/hosts`` share of the first ``limit``; streamed, the first ``limit`` of its share."""
    if resident:
        return (min(count, limit) if limit else count) // hosts
    share = count // hosts
    return min(share, limit) if limit else share


def _spec(shape, dtype, mesh, spec=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec or P()))


def _rows(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    return _spec(shape, dtype, mesh, P(DATA_AXIS))


def _bytes_per_device(tree: Any, mesh) -> int:
    """Bytes one device holds of abstract arrays (rows split over ``data`` or replicated)."""
    total = 0
    for x in jax.tree.leaves(tree):
        split = x.sharding.spec and x.sharding.spec[0] == DATA_AXIS
        total += math.prod(x.shape) * x.dtype.itemsize // (mesh.size if split else 1)
    return total


def run_targets(config: Any, devices: Sequence[Any]) -> tuple[Setup, list[Target]]:
    """The run's set-up on ``devices`` and every jitted function it calls (see module doc)."""
    mesh = mesh_for(config, devices)
    hosts = len({d.process_index for d in mesh.devices.flat})
    local_devices = mesh.size // hosts
    sizes = dataset_sizes(config)
    resident = sizes.stored_shape is not None
    train = per_host(sizes.train, hosts, config.dataset.max_train_examples, resident)
    test = per_host(sizes.test, hosts, config.dataset.max_test_examples, resident)
    batch, per_device_batch = config.batch_size, config.batch_size // mesh.size
    if sizes.stored_shape is not None:  # resident: [devices x per-device share] rows
        bank_rows = train // local_devices * mesh.size
        test_rows = -(-test // local_devices) * mesh.size
        steps = bank_rows // mesh.size // per_device_batch
        eval_shape = sizes.stored_shape
    else:  # streamed: full host batches; evaluation batches padded
        steps = train // (batch // hosts)
        bank_rows, test_rows = (-(-n // (batch // hosts)) * batch for n in (train, test))
        eval_shape = (config.dataset.image_size,) * 2 + (config.dataset.num_channels,)
    if steps < 1:
        raise ConfigError(f"batch_size {batch} is larger than a host's {train} training examples")
    setup = build(config, steps, mesh=mesh)
    state = setup.abstract_state()
    algorithm = setup.algorithm
    held = {"training state": _bytes_per_device(state, mesh)}  # all run long, besides ...
    if sizes.stored_shape is not None:  # ... the dataset, when it stays on the devices
        pixels = math.prod(sizes.stored_shape)
        held["train images"] = bank_rows * pixels // mesh.size
        held["test images"] = test_rows * pixels // mesh.size
    views = _view_target(setup, sizes, bank_rows, steps)
    views.alongside = _except(held, "train images")
    view_q, view_k = jax.eval_shape(views.fn, *views.args)[:2]
    step = Target(
        "train_step",
        algorithm.train_step,
        (state, view_q, view_k),
        _except(held, "training state"),
        per_device_batch,
    )
    # Resident: one call over all training images (the bank; the test split is smaller).
    eval_batch = bank_rows if sizes.stored_shape is not None else batch
    images = _rows((eval_batch, *eval_shape), jnp.uint8, mesh)
    eval_held = _except(held, "train images")
    if "classifier" in algorithm.parts(state):  # tested by its classifier (evaluate linear)
        evals = _linear_targets(setup, state, images, test_rows, eval_held)
    else:
        evals = _knn_targets(setup, state, images, sizes, bank_rows, test_rows, eval_held)
    return setup, [step, views, *evals]


def _except(held: dict[str, int], *names: str) -> dict[str, int]:
    return {k: v for k, v in held.items() if k not in names}


def _view_target(setup: Setup, sizes: Sizes, bank_rows: int, steps: int) -> Target:
    """The function that makes each step's inputs on the devices from the data."""
    config, mesh, inputs = setup.config, setup.mesh, setup.algorithm.inputs
    rng = jax.eval_shape(lambda: jax.random.key(0))
    common = (_spec((), rng.dtype, mesh), _spec((), jnp.int32, mesh))
    labels = _rows((bank_rows,), jnp.int32, mesh)
    if sizes.stored_shape is None:
        batch, two = config.batch_size, inputs == "two_views"
        crops = _rows((batch, *setup.image_shape), jnp.uint8, mesh)
        second = crops if two else _rows((batch,), jnp.int32, mesh)
        kind = "host crops, augmented"
        if resizes_on_device(config):  # the host's unions and the views' boxes in them
            side = config.dataset.union_buffer
            crops = _rows((batch, side, side, config.dataset.num_channels), jnp.uint8, mesh)
            boxes = _rows((batch, 2 if two else 1, 4), jnp.int32, mesh)
            second, kind = boxes if two else (boxes, second), "host unions, resized, augmented"
        fn = make_crop_augment_fn(mesh, config, labelled=not two)
        return Target(f"views ({kind})", fn, (crops, second, *common))
    table = _spec((steps, config.batch_size), jnp.int32, mesh, EPOCH_TABLE_SPEC)
    images = _rows((bank_rows, *sizes.stored_shape), jnp.uint8, mesh)
    if inputs == "features":
        width = _feature_width(setup, images)
        data = (_rows((bank_rows, width), jnp.float32, mesh), labels)
    else:
        data = images if inputs == "two_views" else (images, labels)
    fn = make_view_fn(mesh, config, steps, inputs)
    kind = "cached features" if inputs == "features" else "resident, augmented"
    return Target(f"views ({kind})", fn, (data, table, *common))


def _feature_width(setup: Setup, images) -> int:
    from moco_jax.evaluation.classifier import ClassifierMonitor

    monitor = ClassifierMonitor(setup, None)
    variables = setup.algorithm.encoder_variables(setup.abstract_state())
    return jax.eval_shape(monitor.features_fn, variables, images)[1].shape[1]


def _knn_targets(setup, state, images, sizes, bank_rows, test_rows, held) -> list[Target]:
    """The kNN monitor's functions: features of a batch, and the accuracy over the whole bank for
    the head, backbone and raw-pixel features."""
    mesh = setup.mesh
    monitor = KnnMonitor(mesh, setup.algorithm.model, setup.config, None, None, sizes.num_classes)
    variables = setup.algorithm.encoder_variables(state)
    head, backbone = jax.eval_shape(monitor.features_fn, variables, images)
    pixels = jax.eval_shape(monitor.pixels_fn, images)
    columns = {"head": head.shape[1], "backbone": backbone.shape[1]}
    feature_bytes = {k: (bank_rows + test_rows) * d * 4 // mesh.size for k, d in columns.items()}
    targets = [
        Target("knn features", monitor.features_fn, (variables, images), {**held}),
        Target("knn pixel features", monitor.pixels_fn, (images,), {**held}),
    ]
    for name, width in [*columns.items(), ("pixels", pixels.shape[1])]:
        args = (
            _rows((test_rows, width), jnp.float32, mesh),
            _rows((test_rows,), jnp.int32, mesh),
            _rows((bank_rows, width), jnp.float32, mesh),
            _rows((bank_rows,), jnp.int32, mesh),
        )
        others = {f"{k} features": v for k, v in feature_bytes.items() if k != name}
        targets.append(
            Target(f"knn accuracy ({name})", monitor.counts_fn, args, {**held, **others})
        )
    return targets


def _linear_targets(setup, state, images, test_rows, held) -> list[Target]:
    """Linear evaluation's functions: backbone features of a batch and the classifier's top-1 /
    top-5 counts over the test split."""
    from moco_jax.evaluation.classifier import ClassifierMonitor

    mesh = setup.mesh
    monitor = ClassifierMonitor(setup, None)
    variables = setup.algorithm.encoder_variables(state)
    width = jax.eval_shape(monitor.features_fn, variables, images)[1].shape[1]
    counts_args = (
        setup.algorithm.parts(state)["classifier"],
        _rows((test_rows, width), jnp.float32, mesh),
        _rows((test_rows,), jnp.int32, mesh),
    )
    return [
        Target("linear features", monitor.features_fn, (variables, images), {**held}),
        Target("linear test counts", monitor.counts_fn, counts_args, {**held}),
    ]


def with_batch(config: Any, per_device_batch: int, num_devices: int) -> Any:
    """A copy of ``config`` with ``batch_size = per_device_batch * num_devices``."""
    config = config.copy_and_resolve_references()
    config.batch_size = per_device_batch * num_devices
    return config


def step_target(config: Any, devices: Sequence[Any]) -> Target:
    """Only the training step of ``config`` (e.g. at another batch size), not compiled."""
    return run_targets(config, devices)[1][0]
