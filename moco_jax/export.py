"""Export a run's weights: ``python -m moco_jax.export --workdir W --format F --output FILE``.

Reads ``W/config.json`` and the newest intact checkpoint of ``W`` (or ``--step``) without
writing anything there and without the workdir's lock, so it works while that run trains.
Formats (``interop/formats.py``):

- ``torchvision``: a ``.pth`` state dict of the backbone with torchvision's ResNet names;
  ``torchvision.models.resnet50()`` loads it with ``strict=False``, missing only ``fc`` (a linear
  evaluation's classifier becomes ``fc`` when the run has one);
- ``detectron2``: the ``.pkl`` the official ``detection/convert-pretrain-to-detectron2.py``
  writes, from the query encoder;
- ``moco``: the official ``main_moco.py`` checkpoint (both encoders, the queue, ``epoch`` and
  ``arch``), for the official ``main_lincls.py`` and detection converter (MoCo runs only); of a
  MoCo v3 run, moco-v3's (base and momentum encoders, predictor; no queue), for moco-v3's
  ``main_lincls.py`` and ``convert_to_deit.py``;
- ``deit``: what moco-v3's ``convert_to_deit.py`` writes from that, ``{"model": ...}`` with
  timm's ViT names (ViT runs only).

``torchvision`` and ``detectron2`` are ResNet layouts; a ViT exports as ``deit`` or ``moco``.
All but ``detectron2`` need PyTorch at that moment (an optional extra). torchvision's ResNets
have the 7x7 stem and width 64: a run with ``cifar_stem`` or another ``width_multiplier``
exports with the same names, for a model built like it; likewise a ViT other than moco-v3's
``vit_small``/``vit_base`` exports timm's names for a ``VisionTransformer`` of its shape.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

from absl import app, flags
from etils import epath

from moco_jax import storage
from moco_jax.config.checks import ConfigError
from moco_jax.interop.formats import FORMATS
from moco_jax.run.checkpointing import Checkpointer
from moco_jax.run.saved_run import load_run_config, saved_steps

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
        "torchvision: ResNet backbone .pth; detectron2: the official converter's .pkl; moco: the "
        "official MoCo (v1/v2: both encoders and the queue; v3: base and momentum encoders and "
        "predictor) .pth.tar; deit: a ViT backbone as moco-v3's convert_to_deit.py writes it.",
    )
    flags.DEFINE_string(
        "output", None, "The file to write: a new or regular file, replaced whole if it exists."
    )


def one_device_setup(config: Any):
    """The run's set-up on one device, whatever the run used (the state is replicated)."""
    import jax

    from moco_jax.assemble import build

    one_device = config.copy_and_resolve_references()
    one_device.num_devices = 0
    # steps_per_epoch only shapes the lr schedule, which exporting does not use.
    return build(one_device, 1, devices=jax.devices()[:1])


def restore(workdir: epath.Path, config: Any, step: int | None = None, setup: Any = None):
    """``(setup, state, step, extra)`` of the newest intact checkpoint of ``workdir`` (or of
    ``step``), on one device (``setup``: ``one_device_setup(config)``, made if not given)."""
    steps = saved_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: nothing to export")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; saved: {steps}")
    setup = one_device_setup(config) if setup is None else setup
    # Read-only: no lock, nothing cleaned up or moved (the run may be training and saving).
    reader = Checkpointer(workdir / "checkpoints", config, read_only=True)
    try:
        # All steps: those listed now may be deleted while read, by a run still training.
        state = reader.restore_latest(_template(setup), None if step is None else [step])
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
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    if any(is_key(x) and (x.dtype, x.shape) != (key.dtype, ()) for x in jax.tree.leaves(abstract)):
        return setup.initial_state()  # a key of another kind: let the algorithm make it
    return jax.tree.map(lambda x: jax.device_put(key, x.sharding) if is_key(x) else x, abstract)


def moco_layout(parts: Mapping[str, Any]) -> str | None:
    """Which official checkpoint ``--format=moco`` writes of a state with ``parts``
    (``Algorithm.parts``): ``"v3"`` (momentum encoder and predictor), ``"v1/v2"`` (momentum
    encoder and queue), or None: the run has no momentum encoder to write."""
    if "momentum_encoder" not in parts:
        return None
    if "predictor" in parts:
        return "v3"
    return "v1/v2" if "queue" in parts and "queue_ptr" in parts else None


def layout(fmt: str, setup: Any, state: Any, step: int, extra: dict) -> dict[str, Any]:
    """The payload of format ``fmt`` (numpy arrays) from a restored ``state``, read through the
    algorithm's record (``encoder_variables`` and ``parts``)."""
    import jax

    from moco_jax.interop import formats

    encoder = jax.device_get(setup.algorithm.encoder_variables(state))
    parts = setup.algorithm.parts(state)  # on device: each format fetches only what it writes
    image_size = setup.config.dataset.image_size
    if fmt in ("torchvision", "deit"):
        classifier = jax.device_get(parts.get("classifier"))
        if fmt == "deit":
            return formats.deit_model(encoder, image_size, classifier)
        return formats.torchvision_state_dict(encoder, classifier)
    if fmt == "detectron2":
        return formats.detectron2_model(encoder)
    key = jax.device_get(parts["momentum_encoder"])
    steps_per_epoch = extra.get("steps_per_epoch")
    epoch = step // steps_per_epoch if steps_per_epoch else 0  # completed epochs
    backbone = setup.config.model.backbone
    if moco_layout(parts) == "v3":
        return formats.moco_v3_checkpoint(
            encoder, key, jax.device_get(parts["predictor"]), image_size, backbone, epoch
        )
    queue, queue_ptr = jax.device_get(parts["queue"]), int(parts["queue_ptr"])
    return formats.moco_checkpoint(encoder, key, queue, queue_ptr, backbone, epoch, image_size)


def export_weights(workdir: str, fmt: str, output: str, step: int | None = None) -> dict:
    """Write the weights of ``workdir``'s newest intact checkpoint to ``output`` as ``fmt``;
    returns what was written."""
    from moco_jax.interop import torch_files

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    workdir_path, output_path = epath.Path(workdir), epath.Path(output)
    config = load_run_config(workdir_path)
    setup = one_device_setup(config)
    _refuse_what_does_not_apply(fmt, setup, workdir)
    if fmt != "detectron2":
        torch_files.require_torch(f"--format={fmt}")
    _check_output(output_path, workdir_path)
    setup, state, step, extra = restore(workdir_path, config, step, setup)
    payload = layout(fmt, setup, state, step, extra)
    storage.write_whole(output_path, encode(fmt, payload), "--output")
    tensors = payload.get("model") or payload.get("state_dict") or payload
    return {"output": str(output_path), "format": fmt, "step": step, "tensors": len(tensors)}


def encode(fmt: str, payload: dict[str, Any]) -> bytes:
    """The file's bytes: a plain pickle for ``detectron2``, ``torch.save``'s format otherwise."""
    from moco_jax.interop import torch_files

    return pickle.dumps(payload) if fmt == "detectron2" else torch_files.save_torch_file(payload)


def _refuse_what_does_not_apply(fmt: str, setup: Any, workdir: str) -> None:
    """``ConfigError`` for a format that does not hold this run's model or algorithm (its
    state's ``parts``, from shapes: nothing is restored yet)."""
    from moco_jax.models.resnet import RESNET_SPECS
    from moco_jax.models.vit import VIT_SPECS

    algorithm, backbone = setup.algorithm, setup.config.model.backbone
    vit = backbone in VIT_SPECS
    if not vit and backbone not in RESNET_SPECS:  # a fork's, or a test's: no PyTorch names
        raise ConfigError(
            f"{workdir}'s backbone {backbone!r} has no PyTorch layout: every format writes "
            f"torchvision's ResNet names ({', '.join(RESNET_SPECS)}) or timm's ViT names "
            f"({', '.join(VIT_SPECS)}); a fork's backbone needs its own name map to export"
        )
    instead = "--format=deit" if vit else "--format=torchvision or detectron2"
    if fmt == "moco" and moco_layout(algorithm.parts(setup.abstract_state())) is None:
        raise ConfigError(
            f"--format=moco holds MoCo's momentum encoder, but {workdir} is a run of algorithm "
            f"{algorithm.name!r}: export its encoder with {instead}"
        )
    if fmt == "deit" and not vit:
        raise ConfigError(
            f"--format=deit is timm's ViT layout, but {workdir}'s backbone is {backbone}: "
            f"export it with --format=torchvision, detectron2 or moco"
        )
    if fmt in ("torchvision", "detectron2") and vit:
        raise ConfigError(
            f"--format={fmt} is a ResNet layout, but {workdir}'s backbone is the ViT {backbone}: "
            f"export it with --format=deit (timm's names) or --format=moco"
        )


def _check_output(output: epath.Path, workdir: epath.Path) -> None:
    """Refuse, before anything is restored, an ``--output`` that writing would not replace as a
    file (a directory, device, FIFO, socket: ``storage``), in a directory that does not
    exist, or inside the run's checkpoint directories (orbax's: a stray file there is damage)."""
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a directory: give a file name")
    storage.check_output(output, "--output")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"--output {output}: the directory {output.parent} does not exist")
    for name in ("checkpoints", "checkpoints_damaged"):
        if storage.is_within(output, workdir / name):
            raise ConfigError(
                f"--output {output} is inside {workdir / name}, which holds the run's "
                f"checkpoints: write the export elsewhere"
            )


def _notes(config: Any) -> list[str]:
    from moco_jax.models.vit import VIT_SPECS, vit_width

    model = config.model
    if model.backbone in VIT_SPECS:
        patch, _, depth, heads = VIT_SPECS[model.backbone]
        width = vit_width(model.backbone, model.width_multiplier)
        if model.backbone in ("vit_small", "vit_base") and model.width_multiplier == 1:
            return []
        return [
            f"{model.backbone} is not one of moco-v3's vits.py models: timm's VisionTransformer "
            f"with img_size={config.dataset.image_size}, patch_size={patch}, "
            f"in_chans={config.dataset.num_channels}, embed_dim={width}, depth={depth}, "
            f"num_heads={heads}, mlp_ratio=4, qkv_bias=True, LayerNorm eps 1e-6 (and MoCo v3's "
            f"sin-cos pos_embed)"
        ]
    notes = []
    if model.cifar_stem:
        notes.append("the CIFAR stem (3x3 conv1, no max-pool): torchvision's resnet has 7x7")
    if model.width_multiplier != 1:
        notes.append(f"width_multiplier {model.width_multiplier}: torchvision's resnet has 1")
    return notes


def main(argv):
    del argv
    import jax

    from moco_jax.run.cli_errors import quiet_library_logs, run_with_clear_errors

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


def run() -> None:
    """The program: python -m moco_jax.export, and the moco-export script."""
    from moco_jax.run.cli_errors import flags_parser, quiet_native_logs

    quiet_native_logs()
    define_flags()
    parser = flags_parser(required=("workdir", "format", "output"), usage=__doc__)
    app.run(main, flags_parser=parser)


if __name__ == "__main__":
    run()
