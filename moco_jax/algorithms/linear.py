"""Linear classification on frozen features: how MoCo is measured (the official ``main_lincls.py``).

The pretrained backbone is frozen, BatchNorm in evaluation mode (its running statistics never
change), the projection head dropped; a new linear classifier on the pooled backbone features,
weight ~ N(0, 0.01) and bias 0, is trained with cross-entropy by SGD (momentum 0.9, no weight
decay, lr 30 per 256 images, x0.1 at epochs 60 and 80 of 100 in MoCo v1/v2). Two switches:

- ``linear.train_backbone``: end-to-end fine-tuning. The whole encoder trains, BN in train mode
  (statistics as ``model.bn_mode`` says), the backbone at ``linear.backbone_lr`` per 256 under
  the same schedule shape as the classifier.
- ``linear.cached_features``: the step takes each image's features, computed once without
  augmentation (``moco_jax.run.linear_eval``), instead of images: a faster, different
  protocol.

One step per device (inside ``jax.shard_map``), state replicated, batch sharded:
``(state, images or features, labels) -> (state, {"loss", "top1", "learning_rate"})``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from moco_jax.algorithms import Algorithm, image_shape, register_algorithm
from moco_jax.algorithms.data_parallel import device_mean, jit_step, mean_value_and_grad
from moco_jax.models import Encoder, bn_axis_name, build_encoder
from moco_jax.optim import make_lr_schedule, make_optimizer


@flax.struct.dataclass
class LinearState:
    """The backbone (frozen unless fine-tuning), the classifier and the optimizer.

    Attributes:
      step: number of optimizer steps taken.
      params: ``{"backbone": encoder weights, "classifier": {"kernel": [F, C], "bias": [C]}}``.
      batch_stats: ``{"backbone": BN running statistics}`` (unchanged unless fine-tuning).
      opt_state: optax state of the classifier's optimizer (of both parts when fine-tuning).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState

    def encoder_variables(self) -> dict[str, Any]:
        """The encoder's Flax variables (a backbone, no head): what the features, export and the
        sanity check use."""
        return {
            "params": {"backbone": self.params["backbone"]},
            "batch_stats": {"backbone": self.batch_stats.get("backbone", {})},
        }

    def parts(self) -> dict[str, Any]:
        """The classifier (``Algorithm.parts``: tested each epoch, exported as ``fc``)."""
        return {"classifier": self.params["classifier"]}


class NoHead(nn.Module):
    """The projection head is dropped: the "embedding" is the pooled feature itself."""

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        del train
        return features


def backbone_model(model_config: Any) -> Encoder:
    """The pretrained encoder without its head: ``apply(...) -> (features, features)``."""
    encoder = build_encoder(model_config, bn_axis_name(model_config.bn_mode))
    return Encoder(backbone=encoder.backbone, head=NoHead())


def classify(classifier: dict, features: jax.Array) -> jax.Array:
    """The linear classifier: float32 logits ``features @ kernel + bias``."""
    return features.astype(jnp.float32) @ classifier["kernel"] + classifier["bias"]


def create_state(rng, model, optimizer, image_shape, num_classes, init_std, fine_tune):
    """A random-init backbone (``init_from`` replaces it) and a fresh classifier."""
    init_rng, classifier_rng = jax.random.split(rng)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    variables = model.init(init_rng, dummy, train=False)
    features, _ = jax.eval_shape(lambda: model.apply(variables, dummy, train=False))
    classifier = {
        "kernel": init_std * jax.random.normal(classifier_rng, (features.shape[-1], num_classes)),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    backbone = variables.get("params", {}).get("backbone", {})  # none for model.backbone=pixels
    params = {"backbone": backbone, "classifier": classifier}
    batch_stats = {"backbone": variables.get("batch_stats", {}).get("backbone", {})}
    trained = params if fine_tune else classifier
    return LinearState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(trained),
    )


def load_encoder(state: LinearState, variables: dict[str, Any]) -> LinearState:
    """``state`` with ``variables``' backbone (``init_from``/``pretrained``); the head, if any,
    is dropped."""
    params = {**state.params, "backbone": variables.get("params", {}).get("backbone", {})}
    batch_stats = {"backbone": variables.get("batch_stats", {}).get("backbone", {})}
    return state.replace(params=params, batch_stats=batch_stats)


def make_train_step(
    model, optimizer, schedule, mesh: Mesh, *, fine_tune, cached, bn_mode, ordered=False
):
    """The jitted step ``(state, inputs, labels) -> (state, metrics)``; donates ``state``.

    ``inputs``: augmented images ``[B, H, W, C]`` or, with ``cached``, features ``[B, F]``;
    global arrays sharded over the ``data`` axis, as ``labels`` ``[B]``. ``ordered``: means over
    devices in device order (``data_parallel.device_mean``).
    """
    mean = device_mean(mesh, ordered)

    def features_of(params, batch_stats, inputs):
        """Pooled features and the BN statistics after this batch (fine-tuning only)."""
        if cached:
            return inputs, batch_stats
        variables = {"params": {"backbone": params["backbone"]}, "batch_stats": batch_stats}
        if not fine_tune:  # frozen: BN in evaluation mode, no gradient
            features, _ = model.apply(variables, inputs, train=False)
            return jax.lax.stop_gradient(features), batch_stats
        (features, _), updated = model.apply(variables, inputs, train=True, mutable="batch_stats")
        return features, updated["batch_stats"]

    def per_device(state: LinearState, inputs: jax.Array, labels: jax.Array):
        def loss_fn(trained):
            params = trained if fine_tune else {**state.params, "classifier": trained}
            features, batch_stats = features_of(params, state.batch_stats, inputs)
            logits = classify(params["classifier"], features)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.mean(losses), (batch_stats, logits)

        trained = state.params if fine_tune else state.params["classifier"]
        (loss, (batch_stats, logits)), grads = mean_value_and_grad(loss_fn, trained, mean)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        params = trained if fine_tune else {**state.params, "classifier": trained}
        if fine_tune and bn_mode != "sync":  # per-device statistics: keep their mean
            batch_stats = mean(batch_stats)
        top1 = mean(jnp.mean(jnp.argmax(logits, -1) == labels))
        metrics = {"loss": loss, "top1": top1, "learning_rate": jnp.float32(schedule(state.step))}
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return jit_step(per_device, mesh)


def make_linear_optimizer(config: Any, steps_per_epoch: int):
    """``(schedule, optimizer)``: SGD on the classifier; when fine-tuning, a second SGD on the
    backbone at ``linear.backbone_lr`` per 256 under the same schedule shape."""
    optim = config.optim
    schedule = make_lr_schedule(optim, config.batch_size, steps_per_epoch, config.epochs)
    classifier = make_optimizer(optim, schedule)
    if not config.linear.train_backbone:
        return schedule, classifier
    backbone_optim = optim.copy_and_resolve_references()
    backbone_optim.base_lr = config.linear.backbone_lr
    backbone_schedule = make_lr_schedule(
        backbone_optim, config.batch_size, steps_per_epoch, config.epochs
    )
    parts = {"backbone": make_optimizer(optim, backbone_schedule), "classifier": classifier}

    def labels(params):  # every leaf of a part carries the part's name
        return {part: jax.tree.map(lambda _, p=part: p, tree) for part, tree in params.items()}

    return schedule, optax.multi_transform(parts, labels)


@register_algorithm("linear")
def build(config: Any, mesh: Mesh, steps_per_epoch: int) -> Algorithm:
    """The linear protocol (or fine-tuning) from a validated linear config."""
    linear = config.linear
    model = backbone_model(config.model)
    schedule, optimizer = make_linear_optimizer(config, steps_per_epoch)
    step = make_train_step(
        model,
        optimizer,
        schedule,
        mesh,
        fine_tune=linear.train_backbone,
        cached=linear.cached_features,
        bn_mode=config.model.bn_mode,
        ordered=config.ordered_reductions,
    )
    return Algorithm(
        name="linear",
        model=model,
        schedule=schedule,
        init_state=lambda rng: create_state(
            rng,
            model,
            optimizer,
            image_shape(config),
            linear.num_classes,
            linear.init_std,
            linear.train_backbone,
        ),  # fmt: skip
        train_step=step,
        encoder_variables=LinearState.encoder_variables,
        load_encoder=load_encoder,
        parts=LinearState.parts,
        inputs="features" if linear.cached_features else "labelled_view",
    )
