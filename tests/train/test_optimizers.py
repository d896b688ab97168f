"""Tests for t5align.train.optimizers.

The Adafactor test compares against `_t5x_adafactor_reference`, a float64
NumPy implementation of the T5X rule written from the algorithm (Shazeer &
Stern 2018, with T5X's defaults), sharing no code with optax.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5align.train import optimizers


def _t5x_adafactor_reference(params, grads_per_step, *, lr, decay_rate=0.8,
                             clipping_threshold=1.0, epsilon1=1e-30,
                             epsilon2=1e-3, min_dim_size_to_factor=128,
                             weight_decay=0.0):
  """Runs T5X Adafactor on dicts of 1-D/2-D float64 arrays.

  Returns (params after each step, second-moment state, whether clipping was
  active per (step, name)).
  """
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  rows, cols, full = {}, {}, {}
  history, clipped = [], {}
  for step, grads in enumerate(grads_per_step, start=1):
    beta2 = 1.0 - step ** (-decay_rate)  # 0 on the first step
    new_params = {}
    for name, p in params.items():
      g = np.asarray(grads[name], np.float64)
      g2 = g * g + epsilon1
      factored = p.ndim == 2 and min(p.shape) >= min_dim_size_to_factor
      if factored:
        # Rank-1 estimate from row and column means of g^2.
        rows[name] = beta2 * rows.get(name, 0.0) + (1 - beta2) * g2.mean(axis=1)
        cols[name] = beta2 * cols.get(name, 0.0) + (1 - beta2) * g2.mean(axis=0)
        v_hat = np.outer(rows[name], cols[name]) / rows[name].mean()
      else:
        full[name] = beta2 * full.get(name, 0.0) + (1 - beta2) * g2
        v_hat = full[name]
      u = g / np.sqrt(v_hat)
      rms_u = math.sqrt(np.mean(u * u))
      clipped[(step, name)] = rms_u > clipping_threshold
      u = u / max(1.0, rms_u / clipping_threshold)
      scale = max(math.sqrt(np.mean(p * p)), epsilon2)
      new_params[name] = (1.0 - weight_decay) * p - lr * scale * u
    params = new_params
    history.append(params)
  return history, {"rows": rows, "cols": cols, "full": full}, clipped


def _adafactor_problem():
  rng = np.random.default_rng(0)
  params = {
      "kernel_tall": rng.normal(size=(160, 136)),  # factored
      "kernel_wide": rng.normal(size=(136, 200)) * 0.05,  # factored
      "kernel_thin": rng.normal(size=(96, 300)),  # 96 < 128: not factored
      "scale": 1.0 + 0.1 * rng.normal(size=(64,)),  # vector: not factored
      "tiny": 1e-5 * rng.normal(size=(32,)),  # RMS below the 1e-3 floor
  }
  grads = []
  # Growing gradients make the lagging second moments trigger clipping.
  for step_scale in (0.1, 1.0, 10.0):
    step_grads = {}
    for name, p in params.items():
      # Uneven row/column magnitudes give the factored estimate some work.
      g = rng.normal(size=p.shape) * step_scale
      if p.ndim == 2:
        g *= np.exp(rng.normal(size=(p.shape[0], 1)))
        g *= np.exp(rng.normal(size=(1, p.shape[1])))
      step_grads[name] = g
    grads.append(step_grads)
  return params, grads


def _run_optax(tx, params, grads_per_step):
  """Returns the float32 update of every step and the final state."""
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for grads in grads_per_step:
    grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, updates))
  return history, state


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("which", ["make_optimizer", "optax.adafactor"])
def test_adafactor_matches_t5x_reference(which, weight_decay):
  params, grads = _adafactor_problem()
  lr = 0.01
  if which == "make_optimizer":
    tx = optimizers.make_optimizer(name="adafactor", learning_rate=lr,
                                   weight_decay=weight_decay)
  else:
    tx = optax.adafactor(
        learning_rate=lr,
        weight_decay_rate=weight_decay if weight_decay else None)
  got, state = _run_optax(tx, params, grads)
  expected, moments, clipped = _t5x_adafactor_reference(
      params, grads, lr=lr, weight_decay=weight_decay)
  # The problem must exercise clipping, both factoring branches and the floor.
  assert any(clipped.values()) and not all(clipped.values())
  assert math.sqrt(np.mean(params["tiny"] ** 2)) < 1e-3
  previous = params
  for step in range(3):
    for name in params:
      # Updates, not parameters: float32 rounding of parameters near 1 would
      # hide errors in updates of size 1e-4.
      # atol covers entries where weight decay cancels the Adafactor step.
      want = expected[step][name] - previous[name]
      np.testing.assert_allclose(
          got[step][name], want, rtol=1e-4, atol=1e-6 * np.abs(want).max(),
          err_msg=f"{name}, step {step + 1}")
    previous = expected[step]
  # Factored statistics: optax keeps the smaller dimension in v_row.
  factored_state = state[0]
  assert isinstance(factored_state, optax.FactoredState)
  np.testing.assert_allclose(factored_state.v_row["kernel_tall"],
                             moments["cols"]["kernel_tall"], rtol=1e-4)
  np.testing.assert_allclose(factored_state.v_col["kernel_tall"],
                             moments["rows"]["kernel_tall"], rtol=1e-4)
  np.testing.assert_allclose(factored_state.v_row["kernel_wide"],
                             moments["rows"]["kernel_wide"], rtol=1e-4)
  np.testing.assert_allclose(factored_state.v["scale"],
                             moments["full"]["scale"], rtol=1e-4)
  assert factored_state.v["kernel_tall"].shape == (1,)
  assert factored_state.v["kernel_thin"].shape == (96, 300)


# ------------------------------------------------------------------ schedules

SCHEDULE_CASES = [
    # (kwargs, [(step, expected lr)]) with peak 1.0, worked out by hand.
    (dict(), [(0, 1.0), (7, 1.0), (10**6, 1.0)]),
    (dict(warmup_steps=10), [(0, 0.0), (5, 0.5), (10, 1.0), (500, 1.0)]),
    (dict(warmup_steps=10, decay="linear", total_steps=110),
     [(5, 0.5), (10, 1.0), (60, 0.5), (110, 0.0), (300, 0.0)]),
    (dict(warmup_steps=10, decay="linear", total_steps=110,
          final_learning_rate=0.1),
     [(60, 0.55), (110, 0.1), (300, 0.1)]),
    # cos(pi/4): 0.5 (1 + 0.70710678) = 0.85355339
    (dict(warmup_steps=10, decay="cosine", total_steps=110),
     [(5, 0.5), (10, 1.0), (35, 0.8535533905932737), (60, 0.5), (110, 0.0)]),
    (dict(decay="cosine", total_steps=100, final_learning_rate=0.1),
     [(0, 1.0), (50, 0.55), (100, 0.1), (150, 0.1)]),
    (dict(warmup_steps=100, decay="rsqrt"),
     [(50, 0.5), (100, 1.0), (400, 0.5), (10000, 0.1)]),
    (dict(decay="rsqrt"), [(0, 1.0), (1, 1.0), (4, 0.5), (100, 0.1)]),
]


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kwargs,points", SCHEDULE_CASES)
def test_schedule_hand_values(kwargs, points, use_jit):
  schedule = optimizers.make_schedule(learning_rate=1.0, **kwargs)
  if use_jit:
    schedule = jax.jit(schedule)
  for step, expected in points:
    np.testing.assert_allclose(schedule(jnp.int32(step)), expected, rtol=1e-6,
                               atol=1e-7, err_msg=f"step {step}")


@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_make_optimizer_follows_schedule(name):
  # With a constant gradient and no parameter scaling, both optimizers move
  # each weight by lr(step) * sign(g) (Adam's bias-corrected ratio is 1, the
  # unfactored Adafactor update g / sqrt(g^2) is +-1 and is not clipped;
  # rtol covers float32 cancellation in Adam's 1 - b2^t).
  tx = optimizers.make_optimizer(
      name=name, learning_rate=0.1, warmup_steps=4,
      adafactor=optimizers.AdafactorSettings(
          multiply_by_parameter_scale=False))
  params = {"w": jnp.zeros((3,))}
  grads = {"w": jnp.array([2.0, -0.5, 3.0])}
  state = tx.init(params)
  for step, lr in enumerate([0.0, 0.025, 0.05, 0.075, 0.1, 0.1]):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], [-lr, lr, -lr], rtol=1e-4,
                               atol=1e-9, err_msg=f"step {step}")


# -------------------------------------------------------- gradient accumulation


def _regression_problem():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)

  def loss(p, x, y):  # mean over examples
    residual = x @ p["w"] + p["b"][None, :] - y  # [batch, 3]
    return jnp.mean(jnp.sum(jnp.square(residual), axis=-1))

  return params, x, y, jax.jit(jax.grad(loss))


@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_grad_accumulation_equals_full_batch_step(name):
  params, x, y, grad_fn = _regression_problem()
  k = 4
  # Large epsilons make both optimizers sensitive to the gradient's scale, so
  # summing instead of averaging the microbatch gradients would show.
  kwargs = dict(name=name, learning_rate=0.05, warmup_steps=2,
                adafactor=optimizers.AdafactorSettings(
                    min_dim_size_to_factor=2, epsilon1=1.0),
                adamw=optimizers.AdamWSettings(eps=1.0))
  full_tx = optimizers.make_optimizer(**kwargs)
  accum_tx = optimizers.make_optimizer(grad_accum_steps=k, **kwargs)
  full_params, accum_params = params, params
  full_state, accum_state = full_tx.init(params), accum_tx.init(params)
  # Microbatch updates and the full-batch reference, jitted like training.
  full_update = jax.jit(full_tx.update)
  accum_update = jax.jit(accum_tx.update)
  for _ in range(3):  # warm-up makes the step count matter
    updates, full_state = full_update(grad_fn(full_params, x, y), full_state,
                                      full_params)
    full_params = optax.apply_updates(full_params, updates)
    for micro in range(k):
      rows = slice(2 * micro, 2 * micro + 2)
      updates, accum_state = accum_update(
          grad_fn(accum_params, x[rows], y[rows]), accum_state, accum_params)
      if micro < k - 1:
        assert all(not np.any(u) for u in jax.tree.leaves(updates))
      accum_params = optax.apply_updates(accum_params, updates)
    for key in params:
      np.testing.assert_allclose(accum_params[key], full_params[key],
                                 rtol=1e-5, atol=1e-6)
  # The optimizer has moved away from the start (warm-up step 0 has lr 0).
  assert not np.allclose(full_params["w"], params["w"])


# ------------------------------------------------------------------ validation

BAD_ARGUMENTS = [
    (dict(name="sgd"), "name='sgd'"),
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(learning_rate=float("nan")), "learning_rate=nan"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(warmup_steps=2.5), "warmup_steps=2.5"),
    (dict(decay="exponential"), "decay='exponential'"),
    (dict(decay="linear"), "total_steps=None"),
    (dict(decay="cosine", warmup_steps=10, total_steps=10), "total_steps=10"),
    (dict(total_steps=0), "total_steps=0"),
    (dict(final_learning_rate=0.1), "final_learning_rate=0.1"),
    (dict(decay="linear", total_steps=10, final_learning_rate=2.0),
     "final_learning_rate=2.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(grad_accum_steps=0), "grad_accum_steps=0"),
    (dict(grad_accum_steps=True), "grad_accum_steps=True"),
    (dict(adafactor=optimizers.AdafactorSettings(clipping_threshold=0.5)),
     "adafactor.clipping_threshold=0.5"),
    (dict(adafactor=optimizers.AdafactorSettings(decay_rate=0.0)),
     "adafactor.decay_rate=0.0"),
    (dict(name="adamw", adamw=optimizers.AdamWSettings(b2=1.0)),
     "adamw.b2=1.0"),
]


@pytest.mark.parametrize("overrides,message", BAD_ARGUMENTS,
                         ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_are_named(overrides, message):
  kwargs = dict(name="adafactor", learning_rate=1e-3)
  kwargs.update(overrides)
  with pytest.raises(ValueError, match="make_optimizer: " + re.escape(message)):
    optimizers.make_optimizer(**kwargs)


def test_no_accumulation_returns_plain_optimizer_state():
  tx = optimizers.make_optimizer(name="adafactor", learning_rate=1e-3)
  state = tx.init({"w": jnp.zeros((2,))})
  assert not isinstance(state, optax.MultiStepsState)
  tx = optimizers.make_optimizer(name="adafactor", learning_rate=1e-3,
                                 grad_accum_steps=2)
  assert isinstance(tx.init({"w": jnp.zeros((2,))}), optax.MultiStepsState)
