"""``MoCoState``: everything a run needs to resume bit-for-bit, as one pytree of arrays."""

from __future__ import annotations

from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax

from moco_jax.queue import init_queue


@flax.struct.dataclass
class MoCoState:
    """Online (query) and EMA (key) encoders, optimizer state, queue, and RNG.

    Attributes:
      step: number of optimizer steps taken.
      params / batch_stats: the query encoder (trained by gradient).
      ema_params / ema_batch_stats: the key encoder; params follow the momentum update, BN running
        statistics come from its own forward passes (as in the reference).
      opt_state: optax state of the query encoder's optimizer.
      queue: ``[K, D]`` L2-normalised keys of earlier steps (negatives).
      queue_ptr: int32 index where the next keys are written.
      rng: PRNG key for this run's randomness inside the step (key shuffling).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: optax.OptState
    queue: jax.Array
    queue_ptr: jax.Array
    rng: jax.Array

    def query_variables(self) -> dict[str, Any]:
        """Flax variables of the query encoder (what evaluation and transfer use)."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(
    rng: jax.Array,
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    queue_size: int,
) -> MoCoState:
    """Fresh state: the key encoder starts as an exact copy of the query encoder."""
    init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    # train=False: no batch statistics, so BN synced over a mesh axis initialises outside shard_map.
    variables = model.init(init_rng, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    _, embedding = jax.eval_shape(lambda: model.apply(variables, dummy, train=False))
    return MoCoState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        opt_state=optimizer.init(params),
        queue=init_queue(queue_rng, queue_size, embedding.shape[-1]),
        queue_ptr=jnp.zeros((), jnp.int32),
        rng=state_rng,
    )
