"""Optimizers and learning-rate schedules for every t5align training stage.

`make_optimizer` is the one factory the training loop calls. It returns an
`optax.GradientTransformation`:

- 'adafactor': the T5X Adafactor update (t5x/adafactor.py defaults: decay
  rate 0.8 with beta2_t = 1 - t^-0.8, no momentum, update clipping at RMS 1.0,
  step size multiplied by max(RMS(param), 1e-3), epsilon1 1e-30, second
  moments factored when the two largest dimensions are both >= 128), built
  from optax's Adafactor pieces. For parameters of rank <= 2 (all of ours:
  T5X falls back to this size heuristic for them even with logical factor
  rules) it reproduces T5X's update; tests/train/test_optimizers.py checks it
  against an independent NumPy implementation of the T5X rule.
- 'adamw': `optax.adamw`.

Learning-rate schedules are functions of the optimizer step (0 for the first
update): constant, or linear warm-up (T5X's `linear_warmup`,
lr * min(1, step / warmup_steps), so the first update has learning rate 0)
followed by constant, linear, cosine or rsqrt decay.

Gradient accumulation uses `optax.MultiSteps`: call `update` once per
microbatch with that microbatch's gradient; the updates are zero except on
every k-th call, which applies the inner optimizer to the mean of the k
gradients. With equal-sized microbatches and a loss that is a mean over
examples this equals one step on the full batch. The schedule and Adafactor's
beta2_t count optimizer steps, not microbatches. The accumulator (one float32
copy of the gradients) lives in the optimizer state, so a checkpoint taken
between microbatches resumes exactly.
"""

import dataclasses
import math
import numbers
from typing import Optional

import jax.numpy as jnp
import optax

OPTIMIZER_NAMES = ("adafactor", "adamw")
DECAY_NAMES = ("constant", "linear", "cosine", "rsqrt")


@dataclasses.dataclass(frozen=True)
class AdafactorSettings:
  """T5X Adafactor hyperparameters; the defaults are T5X's.

  Momentum (T5X `beta1`) is not offered: T5X and the paper's setups run
  without it.
  """
  decay_rate: float = 0.8  # beta2_t = 1 - (t - step_offset)^-decay_rate
  step_offset: int = 0
  clipping_threshold: Optional[float] = 1.0  # None disables update clipping
  multiply_by_parameter_scale: bool = True
  epsilon1: float = 1e-30  # added to squared gradients
  epsilon2: float = 1e-3  # floor of the parameter-scale RMS
  min_dim_size_to_factor: int = 128


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
  """`optax.adamw` moments and epsilon."""
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool) and
          math.isfinite(value))


def make_schedule(*, learning_rate: float, warmup_steps: int = 0,
                  decay: str = "constant", total_steps: Optional[int] = None,
                  final_learning_rate: float = 0.0,
                  where: str = "make_schedule") -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0 = first update).

  lr(step) = warm(step) * base(step), warm = min(1, step / warmup_steps)
  (1 without warm-up), and base:
  - 'constant': learning_rate.
  - 'linear': learning_rate at the end of warm-up, falling linearly to
    final_learning_rate at total_steps, then flat.
  - 'cosine': the same end points with a half cosine.
  - 'rsqrt': learning_rate * sqrt(w / max(step, w)), w = max(warmup_steps, 1)
    (T5X's rsqrt decay, normalised to be continuous at the end of warm-up).

  Args:
    learning_rate: peak learning rate, > 0.
    warmup_steps: linear warm-up length, >= 0.
    decay: one of DECAY_NAMES.
    total_steps: required for 'linear' and 'cosine' (> warmup_steps).
    final_learning_rate: end value of 'linear'/'cosine', in [0, learning_rate];
      must stay 0 for the other decays.
    where: name used in error messages.

  Returns:
    step -> learning rate (a float32 array), usable under jit.
  """
  if not _is_real(learning_rate) or learning_rate <= 0:
    raise ValueError(f"{where}: learning_rate={learning_rate!r} must be a "
                     "finite number > 0")
  if not _is_int(warmup_steps) or warmup_steps < 0:
    raise ValueError(f"{where}: warmup_steps={warmup_steps!r} must be an "
                     "integer >= 0")
  if decay not in DECAY_NAMES:
    raise ValueError(f"{where}: decay={decay!r} is not one of {DECAY_NAMES}")
  if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
    raise ValueError(f"{where}: total_steps={total_steps!r} must be an "
                     "integer >= 1 or None")
  if decay in ("linear", "cosine"):
    if total_steps is None or total_steps <= warmup_steps:
      raise ValueError(
          f"{where}: total_steps={total_steps!r} must be an integer > "
          f"warmup_steps={warmup_steps} for decay={decay!r}")
    if not _is_real(final_learning_rate) or not (
        0 <= final_learning_rate <= learning_rate):
      raise ValueError(
          f"{where}: final_learning_rate={final_learning_rate!r} must lie in "
          f"[0, learning_rate={learning_rate}]")
  elif final_learning_rate != 0:
    raise ValueError(
        f"{where}: final_learning_rate={final_learning_rate!r} only applies to "
        f"decay 'linear' or 'cosine', not {decay!r}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if decay == "constant":
      base = jnp.full_like(step, learning_rate)
    elif decay == "rsqrt":
      w = float(max(warmup_steps, 1))
      base = learning_rate * jnp.sqrt(w / jnp.maximum(step, w))
    else:
      frac = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps),
                      0.0, 1.0)
      if decay == "linear":
        base = learning_rate + (final_learning_rate - learning_rate) * frac
      else:
        base = final_learning_rate + (learning_rate - final_learning_rate) * (
            0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    if warmup_steps == 0:
      return base
    return base * jnp.minimum(1.0, step / warmup_steps)

  return schedule


def t5x_adafactor(learning_rate: optax.ScalarOrSchedule, *,
                  settings: AdafactorSettings = AdafactorSettings(),
                  weight_decay: float = 0.0) -> optax.GradientTransformation:
  """T5X's Adafactor update as an optax chain.

  Per parameter, with g the gradient and t the 1-based step:
    beta2_t = 1 - t^-decay_rate; v = EMA_beta2_t(g^2 + epsilon1), factored
    into row and column means (v_hat = R C^T / mean(R)) when the two largest
    dimensions are >= min_dim_size_to_factor; u = g / sqrt(v_hat);
    u /= max(1, RMS(u) / clipping_threshold);
    param <- (1 - weight_decay) param - lr * max(RMS(param), epsilon2) * u.
  `weight_decay` is T5X's `weight_decay_rate`: a per-step fraction that is
  not multiplied by the learning rate.

  Optimizer state (optax FactoredState): `v_row`/`v_col` for factored
  parameters (v_row drops the largest dimension, v_col the second largest),
  `v` for the rest; unused slots are placeholders of shape [1].
  """
  chain = [optax.scale_by_factored_rms(
      factored=True, decay_rate=settings.decay_rate,
      step_offset=settings.step_offset,
      min_dim_size_to_factor=settings.min_dim_size_to_factor,
      epsilon=settings.epsilon1)]
  if settings.clipping_threshold is not None:
    chain.append(optax.clip_by_block_rms(settings.clipping_threshold))
  chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if settings.multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms(min_scale=settings.epsilon2))
  if weight_decay:
    # After the learning-rate scaling, so the decay is not multiplied by it.
    chain.append(optax.add_decayed_weights(weight_decay))
  chain.append(optax.scale(-1.0))
  return optax.chain(*chain)


def _check_adafactor_settings(settings: AdafactorSettings, where: str) -> None:
  if not isinstance(settings, AdafactorSettings):
    raise ValueError(f"{where}: adafactor must be an AdafactorSettings, got "
                     f"{type(settings).__name__}")
  if not _is_real(settings.decay_rate) or settings.decay_rate <= 0:
    raise ValueError(f"{where}: adafactor.decay_rate={settings.decay_rate!r} "
                     "must be > 0")
  if not _is_int(settings.step_offset) or settings.step_offset < 0:
    raise ValueError(f"{where}: adafactor.step_offset="
                     f"{settings.step_offset!r} must be an integer >= 0")
  threshold = settings.clipping_threshold
  if threshold is not None and (not _is_real(threshold) or threshold < 1):
    raise ValueError(f"{where}: adafactor.clipping_threshold={threshold!r} "
                     "must be >= 1 or None")
  for field in ("epsilon1", "epsilon2"):
    value = getattr(settings, field)
    if not _is_real(value) or value < 0:
      raise ValueError(f"{where}: adafactor.{field}={value!r} must be >= 0")
  if not _is_int(settings.min_dim_size_to_factor) or (
      settings.min_dim_size_to_factor < 1):
    raise ValueError(f"{where}: adafactor.min_dim_size_to_factor="
                     f"{settings.min_dim_size_to_factor!r} must be an "
                     "integer >= 1")


def _check_adamw_settings(settings: AdamWSettings, where: str) -> None:
  if not isinstance(settings, AdamWSettings):
    raise ValueError(f"{where}: adamw must be an AdamWSettings, got "
                     f"{type(settings).__name__}")
  for field in ("b1", "b2"):
    value = getattr(settings, field)
    if not _is_real(value) or not 0 <= value < 1:
      raise ValueError(f"{where}: adamw.{field}={value!r} must lie in [0, 1)")
  if not _is_real(settings.eps) or settings.eps <= 0:
    raise ValueError(f"{where}: adamw.eps={settings.eps!r} must be > 0")


def make_optimizer(*, name: str, learning_rate: float, warmup_steps: int = 0,
                   decay: str = "constant", total_steps: Optional[int] = None,
                   weight_decay: float = 0.0, grad_accum_steps: int = 1,
                   final_learning_rate: float = 0.0,
                   adafactor: AdafactorSettings = AdafactorSettings(),
                   adamw: AdamWSettings = AdamWSettings()
                   ) -> optax.GradientTransformation:
  """Builds the optimizer of a training stage.

  Args:
    name: 'adafactor' (T5X Adafactor, t5align's default) or 'adamw'.
    learning_rate, warmup_steps, decay, total_steps, final_learning_rate: the
      schedule, see `make_schedule`.
    weight_decay: >= 0. Adafactor: T5X's per-step fraction, not scaled by the
      learning rate. AdamW: optax's decoupled decay, scaled by the learning
      rate.
    grad_accum_steps: k >= 1 microbatches per optimizer step (see the module
      docstring); 1 disables accumulation.
    adafactor: Adafactor hyperparameters (read only for 'adafactor').
    adamw: AdamW hyperparameters (read only for 'adamw').

  Returns:
    An optax.GradientTransformation; `update` needs `params`.
  """
  where = "make_optimizer"
  if name not in OPTIMIZER_NAMES:
    raise ValueError(f"{where}: name={name!r} is not one of {OPTIMIZER_NAMES}")
  if not _is_real(weight_decay) or weight_decay < 0:
    raise ValueError(f"{where}: weight_decay={weight_decay!r} must be a finite "
                     "number >= 0")
  if not _is_int(grad_accum_steps) or grad_accum_steps < 1:
    raise ValueError(f"{where}: grad_accum_steps={grad_accum_steps!r} must be "
                     "an integer >= 1")
  schedule = make_schedule(
      learning_rate=learning_rate, warmup_steps=warmup_steps, decay=decay,
      total_steps=total_steps, final_learning_rate=final_learning_rate,
      where=where)
  if name == "adafactor":
    _check_adafactor_settings(adafactor, where)
    tx = t5x_adafactor(schedule, settings=adafactor, weight_decay=weight_decay)
  else:
    _check_adamw_settings(adamw, where)
    tx = optax.adamw(schedule, b1=adamw.b1, b2=adamw.b2, eps=adamw.eps,
                     weight_decay=weight_decay)
  if grad_accum_steps == 1:
    return tx
  return optax.MultiSteps(
      tx, every_k_schedule=grad_accum_steps).gradient_transformation()
