"""All training losses: IPO, DPO, SLiC, Best-of-2, SFT and preference models.

This is the only module that defines a loss; online and offline training,
SFT and preference-model training all call into it, so a formula can never
differ between code paths (a failure mode seen in peer libraries, where a
configured IPO silently trained DPO or a different normalisation).

Conventions
- Every function is pure `jax.numpy` and works with or without `jax.jit`.
- Math runs in float32: inputs are upcast to at least float32 (bfloat16
  becomes float32, float64 stays float64 so gradients can be checked by finite
  differences in tests).
- Per-example losses have shape [batch]; reduce them with `batch_mean`.
- Sequence log-probabilities are reduced explicitly with `sequence_logprob`
  (`reduction='sum'` is the default everywhere in t5align, the paper's
  log pi(y|x); `'mean'` is a per-token average). The pair losses take already
  reduced sequence log-probs of shape [batch] and never reduce tokens
  themselves, so the reduction is decided in exactly one place.
- `label` is the probability that the *chosen* (first) response is preferred.
  `None` means the hard label 1. A soft label p gives
  p * L(chosen, rejected) + (1 - p) * L(rejected, chosen); p = 1 is the hard
  loss and p = 0 the hard loss with the roles swapped.

Notation:
  Delta = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
with pi the policy, pi_ref the reference (SFT) policy, y_w the chosen and y_l
the rejected response.
"""

import enum
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

REDUCTIONS = ("sum", "mean")
PAIR_LOSS_NAMES = ("ipo", "dpo", "slic", "best_of_2")
IPO_CONVENTIONS = ("margin", "app_b")


class Reduction(str, enum.Enum):
  """How token log-probs become a sequence log-prob."""
  SUM = "sum"
  MEAN = "mean"


def _as_float(x) -> jax.Array:
  """Upcasts to at least float32 (float64 inputs stay float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_reduction(reduction) -> Reduction:
  try:
    return Reduction(reduction)
  except ValueError:
    raise ValueError(
        f"losses: reduction={reduction!r} is not one of {REDUCTIONS}") from None


def _check_beta(beta, where: str) -> None:
  # Traced values cannot be checked; concrete ones can, and a zero or negative
  # beta would give an infinite or sign-flipped IPO target.
  if isinstance(beta, numbers.Real) and not beta > 0:
    raise ValueError(f"{where}: beta={beta!r} must be > 0")


def _check_batch_vectors(where: str, **arrays) -> None:
  """Pair losses need already-reduced [batch] vectors of one common shape."""
  shape = None
  for name, value in arrays.items():
    if value is None:
      continue
    value_shape = jnp.shape(value)
    if len(value_shape) != 1:
      raise ValueError(
          f"{where}: {name} must have shape [batch] (sequence log-probs "
          f"already reduced with sequence_logprob), got shape {value_shape}")
    if shape is None:
      shape = value_shape
    elif value_shape != shape:
      raise ValueError(
          f"{where}: {name} has shape {value_shape}, expected {shape} like the "
          "other inputs")


def _soft_label(loss_fn, delta: jax.Array, label) -> jax.Array:
  """p * L(Delta) + (1 - p) * L(-Delta); swapping the pair negates Delta."""
  if label is None:
    return loss_fn(delta)
  p = _as_float(label)
  return p * loss_fn(delta) + (1.0 - p) * loss_fn(-delta)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target] per position.

  Args:
    logits: [batch, length, vocab], float32 (upcast if lower precision).
    targets: [batch, length] integer token ids.

  Returns:
    [batch, length] float32 log-probabilities. Padded positions hold the
    log-prob of the pad id, a finite number that `sequence_logprob` masks out.
  """
  logits, targets = _as_float(logits), jnp.asarray(targets)
  if logits.ndim != 3 or targets.shape != logits.shape[:2]:
    raise ValueError(
        "token_logprobs: expected logits [batch, length, vocab] and targets "
        f"[batch, length], got {logits.shape} and {targets.shape}")
  # Gathering the target logit and subtracting logsumexp avoids materialising a
  # second [batch, length, vocab] array for the full log-softmax.
  target_logits = jnp.take_along_axis(
      logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprob(token_logprobs: jax.Array, mask: jax.Array, *,
                     reduction) -> jax.Array:
  """Reduces per-token log-probs over the response tokens.

  Args:
    token_logprobs: [batch, length].
    mask: [batch, length], nonzero on response tokens (EOS included, padding
      excluded); bool or float weights.
    reduction: 'sum' (log pi(y|x), the paper's and t5align's default) or
      'mean' (sum divided by the mask total; 0 for a row with no tokens).

  Returns:
    [batch] sequence log-probs. Values at masked positions never enter, even
    when they are NaN or infinite.
  """
  reduction = _check_reduction(reduction)
  token_logprobs = _as_float(token_logprobs)
  if token_logprobs.ndim != 2 or jnp.shape(mask) != token_logprobs.shape:
    raise ValueError(
        "sequence_logprob: expected token_logprobs and mask of one shape "
        f"[batch, length], got {token_logprobs.shape} and {jnp.shape(mask)}")
  weights = _as_float(mask)
  masked = jnp.where(weights != 0, token_logprobs * weights, 0.0)
  total = jnp.sum(masked, axis=-1)
  if reduction is Reduction.SUM:
    return total
  count = jnp.sum(weights, axis=-1)
  return total / jnp.maximum(count, 1e-9)


def preference_margin(*, policy_chosen, policy_rejected, ref_chosen,
                      ref_rejected) -> jax.Array:
  """Delta = (pw - rw) - (pl - rl), all [batch] sequence log-probs."""
  _check_batch_vectors(
      "preference_margin", policy_chosen=policy_chosen,
      policy_rejected=policy_rejected, ref_chosen=ref_chosen,
      ref_rejected=ref_rejected)
  return ((_as_float(policy_chosen) - _as_float(ref_chosen)) -
          (_as_float(policy_rejected) - _as_float(ref_rejected)))


def ipo_loss(delta: jax.Array, *, beta, convention: str = "margin",
             label=None) -> jax.Array:
  """IPO squared loss per example.

  Two conventions with the same minimiser Delta* = 1/(2 beta):
  - 'margin' (default; Azar et al., main-text eq. 1): (Delta - 1/(2 beta))^2.
  - 'app_b' (paper App. B, f(beta Delta)): (beta Delta - 1/2)^2.
  'app_b' = beta^2 * 'margin' exactly, so gradients differ by the constant
  beta^2 (normalised away by Adafactor/Adam up to epsilon) and logged values
  differ; record the convention with the run.

  Args:
    delta: [batch] preference margin (see `preference_margin`).
    beta: regularisation strength, > 0.
    convention: 'margin' or 'app_b'.
    label: optional [batch] P(chosen preferred).

  Returns:
    [batch] losses.
  """
  _check_beta(beta, "ipo_loss")
  _check_batch_vectors("ipo_loss", delta=delta, label=label)
  delta = _as_float(delta)
  if convention == "margin":
    target = 1.0 / (2.0 * beta)
    loss_fn = lambda d: jnp.square(d - target)
  elif convention == "app_b":
    loss_fn = lambda d: jnp.square(beta * d - 0.5)
  else:
    raise ValueError(f"ipo_loss: convention={convention!r} is not one of "
                     f"{IPO_CONVENTIONS}")
  return _soft_label(loss_fn, delta, label)


def dpo_loss(delta: jax.Array, *, beta, label=None) -> jax.Array:
  """DPO: -log sigmoid(beta Delta) = softplus(-beta Delta).

  With a soft label this is the conservative (cDPO) form.
  """
  _check_beta(beta, "dpo_loss")
  _check_batch_vectors("dpo_loss", delta=delta, label=label)
  return _soft_label(lambda d: jax.nn.softplus(-beta * d), _as_float(delta),
                     label)


def slic_hinge_loss(delta: jax.Array, *, beta, label=None) -> jax.Array:
  """Reference-normalised SLiC hinge (GPO form): max(0, 1 - beta Delta).

  The original SLiC-HF loss (calibration hinge on policy log-probs without a
  reference, plus an SFT regulariser) is deliberately not exposed: the paper
  only uses the GPO family, and that form has not been verified against its
  source.
  """
  _check_beta(beta, "slic_hinge_loss")
  _check_batch_vectors("slic_hinge_loss", delta=delta, label=label)
  return _soft_label(lambda d: jax.nn.relu(1.0 - beta * d), _as_float(delta),
                     label)


def best_of_2_loss(policy_chosen: jax.Array, *, policy_rejected=None,
                   label=None) -> jax.Array:
  """Best-of-2 (paper eq. 3): -log pi(y_w|x), i.e. SFT on the winner.

  Uses no reference model and no beta. The sequence log-prob is whatever
  reduction the caller applied. With a soft label p the loss is
  -p log pi(chosen) - (1 - p) log pi(rejected), which needs policy_rejected.
  """
  _check_batch_vectors("best_of_2_loss", policy_chosen=policy_chosen,
                       policy_rejected=policy_rejected, label=label)
  chosen = _as_float(policy_chosen)
  if label is None:
    return -chosen
  if policy_rejected is None:
    raise ValueError(
        "best_of_2_loss: a soft label needs policy_rejected (the loss puts "
        "weight 1 - label on the rejected response)")
  p = _as_float(label)
  return -(p * chosen + (1.0 - p) * _as_float(policy_rejected))


def pair_loss(name: str, *, policy_chosen, policy_rejected, ref_chosen,
              ref_rejected, beta, label=None,
              ipo_convention: str = "margin") -> jax.Array:
  """Per-example loss of the pair method `name` from [batch] sequence log-probs.

  Args:
    name: one of PAIR_LOSS_NAMES ('ipo', 'dpo', 'slic', 'best_of_2').
    policy_chosen, policy_rejected: [batch] policy sequence log-probs.
    ref_chosen, ref_rejected: [batch] reference sequence log-probs; may be
      None for 'best_of_2', which has no reference.
    beta: regularisation strength; may be None for 'best_of_2'.
    label: optional [batch] P(chosen preferred) (None = hard label 1).
    ipo_convention: 'margin' or 'app_b' (only read for 'ipo').

  Returns:
    [batch] losses.
  """
  if name not in PAIR_LOSS_NAMES:
    raise ValueError(
        f"pair_loss: unknown loss name {name!r}; allowed: {PAIR_LOSS_NAMES}")
  if name == "best_of_2":
    return best_of_2_loss(policy_chosen, policy_rejected=policy_rejected,
                          label=label)
  if ref_chosen is None or ref_rejected is None or beta is None:
    raise ValueError(
        f"pair_loss: {name!r} needs ref_chosen, ref_rejected and beta")
  delta = preference_margin(
      policy_chosen=policy_chosen, policy_rejected=policy_rejected,
      ref_chosen=ref_chosen, ref_rejected=ref_rejected)
  if name == "ipo":
    return ipo_loss(delta, beta=beta, convention=ipo_convention, label=label)
  if name == "dpo":
    return dpo_loss(delta, beta=beta, label=label)
  return slic_hinge_loss(delta, beta=beta, label=label)


def batch_mean(values: jax.Array, weights: Optional[jax.Array] = None
               ) -> jax.Array:
  """Mean of per-example values; with weights sum(w v) / sum(w), 0 if all w = 0.

  Weights let a padded batch (e.g. filled up to divide the mesh) drop its
  filler examples.
  """
  values = _as_float(values)
  if weights is None:
    return jnp.mean(values)
  weights = _as_float(weights)
  if weights.shape != values.shape:
    raise ValueError(f"batch_mean: weights shape {weights.shape} differs from "
                     f"values shape {values.shape}")
  total = jnp.sum(weights)
  weighted = jnp.sum(jnp.where(weights != 0, values * weights, 0.0))
  return jnp.where(total > 0, weighted / jnp.where(total > 0, total, 1.0), 0.0)


def pair_metrics(name: str, *, policy_chosen, policy_rejected, ref_chosen,
                 ref_rejected, beta, label=None, ipo_convention: str = "margin",
                 weights=None) -> dict[str, jax.Array]:
  """Scalar training metrics for a pair loss (arguments as in `pair_loss`).

  Keys:
    loss: batch mean of the per-example loss.
    delta_mean: mean Delta.
    accuracy: implied accuracy, mean of 1[Delta > 0] (with a label: 1[Delta > 0]
      where label >= 1/2, else 1[Delta < 0]).
    reward_chosen, reward_rejected: mean implicit rewards
      beta * (log pi - log pi_ref) of each side (DPO's convention).
  Without a reference (best_of_2 with ref_* None) only `loss` is returned.
  """
  metrics = {"loss": batch_mean(
      pair_loss(name, policy_chosen=policy_chosen,
                policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                ref_rejected=ref_rejected, beta=beta, label=label,
                ipo_convention=ipo_convention), weights)}
  if ref_chosen is None or ref_rejected is None:
    return metrics
  delta = preference_margin(
      policy_chosen=policy_chosen, policy_rejected=policy_rejected,
      ref_chosen=ref_chosen, ref_rejected=ref_rejected)
  correct = delta > 0
  if label is not None:
    correct = jnp.where(_as_float(label) >= 0.5, delta > 0, delta < 0)
  scale = 1.0 if beta is None else beta
  metrics.update(
      delta_mean=batch_mean(delta, weights),
      accuracy=batch_mean(correct.astype(delta.dtype), weights),
      reward_chosen=batch_mean(
          scale * (_as_float(policy_chosen) - _as_float(ref_chosen)), weights),
      reward_rejected=batch_mean(
          scale * (_as_float(policy_rejected) - _as_float(ref_rejected)),
          weights),
  )
  return metrics


class TokenLoss(NamedTuple):
  """Summed token losses; the caller normalises (e.g. by `token_count`)."""
  loss_sum: jax.Array  # cross-entropy + z-loss, summed over weighted tokens
  z_loss_sum: jax.Array  # the z-loss part of loss_sum, for logging
  token_count: jax.Array  # sum of the weights


def sft_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                   *, z_loss: float = 1e-4) -> TokenLoss:
  """Token cross-entropy with T5X's z-loss, summed over the batch.

  Per token: -log p(target) + z_loss * logsumexp(logits)^2 (T5X's auxiliary
  term keeping the softmax normaliser near 1; default 1e-4 as in T5X
  training). T5X sums token losses when loss_normalizing_factor is None; we
  return the sum and the token count so the caller normalises explicitly.

  Args:
    logits: [batch, length, vocab].
    targets: [batch, length] token ids.
    weights: [batch, length] loss weights (T5X `decoder_loss_weights`: 1 on
      target tokens including EOS, 0 on padding).
    z_loss: z-loss coefficient (0 disables it).

  Returns:
    TokenLoss of scalars.
  """
  logits, targets = _as_float(logits), jnp.asarray(targets)
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or (
      jnp.shape(weights) != targets.shape):
    raise ValueError(
        "sft_token_loss: expected logits [batch, length, vocab], targets and "
        f"weights [batch, length], got {logits.shape}, {targets.shape}, "
        f"{jnp.shape(weights)}")
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(
      logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  z_term = z_loss * jnp.square(log_z)
  weights = _as_float(weights)
  keep = weights != 0

  def weighted_sum(x):
    return jnp.sum(jnp.where(keep, x * weights, 0.0))

  z_loss_sum = weighted_sum(z_term)
  return TokenLoss(
      loss_sum=weighted_sum(log_z - target_logits) + z_loss_sum,
      z_loss_sum=z_loss_sum,
      token_count=jnp.sum(weights))


def pm_pairwise_loss(logits: jax.Array, label: jax.Array) -> jax.Array:
  """Pairwise preference-model loss: binary cross-entropy on P(first better).

  Args:
    logits: [batch] logit of P(first response better), r = sigmoid(logits).
    label: [batch] target P(first better), hard (0/1) or soft.

  Returns:
    [batch] -label log r - (1 - label) log(1 - r). Combined with
    `random_order_swap` on the data side this is the paper's order-randomised
    loss (App. A.1, eq. 5).
  """
  _check_batch_vectors("pm_pairwise_loss", logits=logits, label=label)
  logits = _as_float(logits)
  p = _as_float(label)
  return p * jax.nn.softplus(-logits) + (1.0 - p) * jax.nn.softplus(logits)


def random_order_swap(rng: jax.Array, first: Any, second: Any,
                      label: jax.Array):
  """With probability 1/2 per example, swaps first and second and flips label.

  The data-side half of the paper's eq. 5: a pair (y_w, y_l) is presented as
  (y_w, y_l) with target 1 or as (y_l, y_w) with target 0, so the preference
  model cannot learn a position bias.

  Args:
    rng: PRNG key.
    first, second: pytrees of one structure whose leaves have the batch as
      leading dimension (e.g. token arrays of the two responses).
    label: [batch] P(first better).

  Returns:
    (first, second, label, swapped) with swapped a [batch] bool array.
  """
  label = _as_float(label)
  if label.ndim != 1:
    raise ValueError(
        f"random_order_swap: label must have shape [batch], got {label.shape}")
  batch = label.shape[0]
  if jax.tree.structure(first) != jax.tree.structure(second):
    raise ValueError(
        "random_order_swap: first and second must have the same structure, got "
        f"{jax.tree.structure(first)} and {jax.tree.structure(second)}")
  for path, leaf in jax.tree_util.tree_leaves_with_path((first, second)):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
      raise ValueError(
          f"random_order_swap: leaf {jax.tree_util.keystr(path)} has shape "
          f"{jnp.shape(leaf)}, expected leading dimension {batch} (the batch)")
  swapped = jax.random.bernoulli(rng, 0.5, (batch,))

  def pick(a, b):
    # [batch, 1, ..., 1] so the choice broadcasts without rank promotion.
    cond = swapped.reshape((batch,) + (1,) * (jnp.ndim(a) - 1))
    return jnp.where(cond, b, a)

  new_first = jax.tree.map(pick, first, second)
  new_second = jax.tree.map(pick, second, first)
  return new_first, new_second, jnp.where(swapped, 1.0 - label, label), swapped


def bradley_terry_loss(reward_chosen: jax.Array, reward_rejected: jax.Array, *,
                       label=None) -> jax.Array:
  """Pointwise reward-model loss -log sigmoid(r_w - r_l) (baseline only).

  With a soft label p: p softplus(-(r_w - r_l)) + (1 - p) softplus(r_w - r_l).
  """
  _check_batch_vectors("bradley_terry_loss", reward_chosen=reward_chosen,
                       reward_rejected=reward_rejected, label=label)
  diff = _as_float(reward_chosen) - _as_float(reward_rejected)
  return _soft_label(lambda d: jax.nn.softplus(-d), diff, label)
