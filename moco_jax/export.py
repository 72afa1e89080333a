"""Export a run's weights: ``python -m moco_jax.export --workdir W --format F --output FILE``.

Reads ``W/config.json`` and the newest intact checkpoint of ``W`` (or ``--step``) without
writing anything there and without the workdir's lock, so it works while that run trains.
Formats (``torch_formats.py``):

- ``torchvision``: a ``.pth`` state dict of the backbone with torchvision's ResNet names;
  ``torchvision.models.resnet50()`` loads it with ``strict=False``, missing only ``fc`` (a linear
  evaluation's classifier becomes ``fc`` when the run has one);
- ``detectron2``: the ``.pkl`` the official ``detection/convert-pretrain-to-detectron2.py``
  writes, from the query encoder;
- ``moco``: the official ``main_moco.py`` checkpoint (both encoders, the queue, ``epoch`` and
  ``arch``), for the official ``main_lincls.py`` and detection converter (MoCo runs only).

``torchvision`` and ``moco`` need PyTorch at that moment (an optional extra); ``detectron2``
does not. torchvision's ResNets have the 7x7 stem and width 64: a run with ``cifar_stem`` or
another ``width_multiplier`` exports with the same names, for a model built like it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

from absl import app, flags
from etils import epath

from moco_jax.checkpointing import Checkpointer
from moco_jax.saved_run import load_run_config, saved_steps
from moco_jax.torch_formats import FORMATS
from moco_jax.validation import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs as a program (not on import: the library
    functions here are imported beside other commands' modules)."""
    flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest intact).")
    flags.DEFINE_enum(
        "format",
        None,
        list(FORMATS),
        "torchvision: backbone .pth; detectron2: the official converter's .pkl; moco: the official "
        "MoCo checkpoint (.pth.tar, both encoders and the queue).",
    )
    flags.DEFINE_string("output", None, "The file to write (replaced whole if it exists).")


def restore(workdir: epath.Path, config: Any, step: int | None = None):
    """``(setup, state, step, extra)`` of the newest intact checkpoint of ``workdir`` (or of
    ``step``), on one device whatever the run used (the state is replicated)."""
    import jax

    from moco_jax.setup import build

    steps = saved_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: nothing to export")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; saved: {steps}")
    one_device = config.copy_and_resolve_references()
    one_device.num_devices = 0
    # steps_per_epoch only shapes the lr schedule, which exporting does not use.
    setup = build(one_device, 1, devices=jax.devices()[:1])
    # Read-only: no lock, nothing cleaned up or moved (the run may be training and saving).
    reader = Checkpointer(workdir / "checkpoints", config, read_only=True)
    try:
        state = reader.restore_latest(_template(setup), steps if step is None else [step])
    finally:
        reader.close()
    return setup, state, reader.restored_step, reader.restored_extra


def _template(setup: Any) -> Any:
    """What to restore into: the state's shapes and shardings, not its values (computing a fresh
    state compiles the initialisation, which takes longer than the export). PRNG keys are real
    keys: restoring makes the saved key data a key like them."""
    import jax

    abstract = setup.abstract_state()
    key = jax.random.key(0)
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    if any(is_key(x) and (x.dtype, x.shape) != (key.dtype, ()) for x in jax.tree.leaves(abstract)):
        return setup.initial_state()  # a key of another kind: let the algorithm make it
    return jax.tree.map(lambda x: jax.device_put(key, x.sharding) if is_key(x) else x, abstract)


def layout(fmt: str, setup: Any, state: Any, step: int, extra: dict) -> dict[str, Any]:
    """The payload of format ``fmt`` (numpy arrays) from a restored ``state``."""
    import jax

    from moco_jax import torch_formats

    encoder = jax.device_get(setup.algorithm.encoder_variables(state))
    if fmt == "torchvision":
        params = getattr(state, "params", None)
        classifier = params.get("classifier") if isinstance(params, Mapping) else None
        return torch_formats.torchvision_state_dict(encoder, jax.device_get(classifier))
    if fmt == "detectron2":
        return torch_formats.detectron2_model(encoder)
    key = jax.device_get({"params": state.ema_params, "batch_stats": state.ema_batch_stats})
    steps_per_epoch = extra.get("steps_per_epoch")
    epoch = step // steps_per_epoch if steps_per_epoch else 0  # completed epochs
    queue, queue_ptr = jax.device_get(state.queue), int(state.queue_ptr)
    backbone = setup.config.model.backbone
    return torch_formats.moco_checkpoint(encoder, key, queue, queue_ptr, backbone, epoch)


def export_weights(workdir: str, fmt: str, output: str, step: int | None = None) -> dict:
    """Write the weights of ``workdir``'s newest intact checkpoint to ``output`` as ``fmt``;
    returns what was written."""
    from moco_jax import torch_bridge

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    workdir_path, output_path = epath.Path(workdir), epath.Path(output)
    config = load_run_config(workdir_path)
    algorithm = config.get("algorithm", "moco")
    if fmt == "moco" and algorithm != "moco":
        raise ConfigError(
            f"--format=moco holds MoCo's key encoder and queue, but {workdir} is a run of "
            f"algorithm {algorithm!r}: export its encoder with --format=torchvision or detectron2"
        )
    if fmt != "detectron2":
        torch_bridge.require_torch(f"--format={fmt}")
    _check_output(output_path)
    setup, state, step, extra = restore(workdir_path, config, step)
    payload = layout(fmt, setup, state, step, extra)
    if fmt == "detectron2":
        data = pickle.dumps(payload)
    else:
        data = torch_bridge.save_torch_file(payload)
    _write_whole(output_path, data)
    tensors = payload.get("model") or payload.get("state_dict") or payload
    return {"output": str(output_path), "format": fmt, "step": step, "tensors": len(tensors)}


def _check_output(output: epath.Path) -> None:
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a directory: give a file name")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"--output {output}: the directory {output.parent} does not exist")


def _write_whole(path: epath.Path, data: bytes) -> None:
    """``path`` holds all of ``data`` or keeps what it had (renamed into place when complete)."""
    if "://" in str(path):  # an object store writes each object whole
        path.write_bytes(data)
        return
    partial = path.parent / f".{path.name}.partial"
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def _notes(config: Any) -> list[str]:
    model = config.model
    notes = []
    if model.cifar_stem:
        notes.append("the CIFAR stem (3x3 conv1, no max-pool): torchvision's resnet has 7x7")
    if model.width_multiplier != 1:
        notes.append(f"width_multiplier {model.width_multiplier}: torchvision's resnet has 1")
    return notes


def main(argv):
    del argv
    import jax

    from moco_jax.cli_errors import quiet_library_logs, run_with_clear_errors

    quiet_library_logs()
    if "JAX_PLATFORMS" not in os.environ:  # the run may hold the accelerator: no need for it
        jax.config.update("jax_platforms", "cpu")
    result = run_with_clear_errors(
        export_weights, FLAGS.workdir, FLAGS.format, FLAGS.output, FLAGS.step
    )
    print(
        f"wrote {result['output']}: {result['format']} weights of step {result['step']} "
        f"({result['tensors']} tensors)"
    )
    config = load_run_config(epath.Path(FLAGS.workdir))
    for note in _notes(config):
        print(f"note: {note}; build the PyTorch model alike")


if __name__ == "__main__":
    define_flags()
    from moco_jax.cli_errors import flags_parser

    app.run(main, flags_parser=flags_parser(required=("workdir", "format", "output")))
