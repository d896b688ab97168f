"""The train state every stage checkpoints: params, optimizer state, step, RNG.

`TrainState` is a plain pytree (a `flax.struct.dataclass`), so it can be
jitted, sharded and handed to Orbax as is. The optimizer itself (an
`optax.GradientTransformation`) is not part of the state: it holds functions,
not arrays, and is rebuilt from the config on resume; it is passed to
`apply_gradients` explicitly.

The RNG is stored as raw key data (`jax.random.key_data`, uint32) rather than
a typed key, because checkpoints store arrays of ordinary dtypes; use
`split_rng` (or `jax.random.wrap_key_data`) to get a typed key back.

A step function written against this state looks like

    def step_fn(state, batch):
      state, key = state.split_rng()
      loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
      return state.apply_gradients(grads, tx), {'loss': loss}
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    params: the model parameters (a nested dict of arrays).
    opt_state: the optax state for `params`.
    step: int32 scalar, the number of updates applied so far. The training
      loop trusts this value after a restore.
    rng: uint32 key data of the run's PRNG key.
  """

  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array

  @classmethod
  def create(cls, *, params: Any, tx: optax.GradientTransformation,
             rng: jax.Array) -> "TrainState":
    """Returns the step-0 state; `rng` may be a typed key or raw key data."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(params=params, opt_state=tx.init(params),
               step=jnp.zeros((), jnp.int32), rng=jnp.asarray(rng, jnp.uint32))

  def apply_gradients(self, grads: Any,
                      tx: optax.GradientTransformation) -> "TrainState":
    """Applies one optimizer update and counts it in `step`."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, step=self.step + 1)

  def split_rng(self) -> tuple["TrainState", jax.Array]:
    """Returns (state with an advanced RNG, a fresh typed key for this step)."""
    key, subkey = jax.random.split(jax.random.wrap_key_data(self.rng))
    return self.replace(rng=jax.random.key_data(key)), subkey
