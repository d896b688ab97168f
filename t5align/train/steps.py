"""The pure per-step functions of every training stage.

Each ``make_*_step`` returns ``step(state, batch) -> (state, metrics)``, a pure
function the training loop jits with shardings and state donation. There is
exactly one alignment step (``make_align_step``): online, offline, replay and
fixed-policy runs differ only in the pair source that fills its batch, never in
the step or the loss. The batch carries the reference log-probs, so the step
never sees reference parameters: offline sources read them from a cache,
online sources compute them while labelling.

Batches (int32 tokens, left-aligned, pad 0, responses end with EOS):

* SFT: ``inputs [B, S]``, ``targets [B, T]``.
* preference model: ``prompt [B, P]``, ``chosen [B, T]``, ``rejected [B, T]``,
  ``label [B]`` = P(chosen is better) (1.0 for hard labels).
* alignment: as the preference batch, plus ``ref_chosen [B]`` and
  ``ref_rejected [B]``, the reference policy's sequence log-probs.

Dropout keys are ``fold_in(state.rng, state.step)``, so a resumed run draws the
same masks as an uninterrupted one.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from t5align import losses
from t5align.models import preference
from t5align.models import t5

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class AlignLoss:
  """Which pair loss the alignment step minimises, and how log-probs are reduced.

  ``reduction`` is 'sum' (the paper's sequence log-probability, the default)
  or 'mean' (per-token average); it applies identically to policy and
  reference log-probs, for every pair source.
  """
  name: str = "ipo"  # 'ipo' | 'dpo' | 'slic' | 'best_of_2'
  beta: float = 0.1
  reduction: str = "sum"
  ipo_convention: str = "margin"  # 'margin': (D - 1/(2 beta))^2; 'app_b': (beta D - 1/2)^2

  def __post_init__(self):
    if self.name not in losses.PAIR_LOSS_NAMES:
      raise ValueError(f"unknown alignment loss {self.name!r}; allowed: {losses.PAIR_LOSS_NAMES}")
    if self.reduction not in losses.REDUCTIONS:
      raise ValueError(f"unknown log-prob reduction {self.reduction!r}; allowed: "
                       f"{losses.REDUCTIONS}")
    if self.ipo_convention not in losses.IPO_CONVENTIONS:
      raise ValueError(f"unknown IPO convention {self.ipo_convention!r}; allowed: "
                       f"{losses.IPO_CONVENTIONS}")
    if self.name != "best_of_2" and not self.beta > 0:
      raise ValueError(f"beta must be positive for {self.name!r}, got {self.beta}")


def _dropout_key(state) -> Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def response_logprobs(params, config: t5.T5Config, prompt: Array, responses: Array, *,
                      reduction: str, enable_dropout: bool = False, dropout_rng=None) -> Array:
  """Sequence log-probs ``[B]`` of ``responses`` given ``prompt`` (pad excluded, EOS included)."""
  rngs = {"dropout": dropout_rng} if enable_dropout else {}
  logits = t5.Transformer(config).apply({"params": params}, prompt, t5.shift_right(responses),
                                        responses, enable_dropout=enable_dropout, rngs=rngs)
  token_lp = losses.token_logprobs(logits, responses)
  return losses.sequence_logprob(token_lp, responses != t5.PAD_ID, reduction=reduction)


def make_sft_step(config: t5.T5Config, tx: optax.GradientTransformation, *,
                  z_loss: float = 1e-4, enable_dropout: bool = True) -> Callable:
  """Token cross-entropy: summed over each target's tokens, averaged over the batch."""

  def step(state, batch: Batch):
    targets = batch["targets"]

    def loss_fn(params):
      rngs = {"dropout": _dropout_key(state)} if enable_dropout else {}
      logits = t5.Transformer(config).apply({"params": params}, batch["inputs"],
                                            t5.shift_right(targets), targets,
                                            enable_dropout=enable_dropout, rngs=rngs)
      token_loss = losses.sft_token_loss(logits, targets, (targets != t5.PAD_ID), z_loss=z_loss)
      return token_loss.loss_sum / targets.shape[0], token_loss

    (loss, token_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "z_loss": token_loss.z_loss_sum / targets.shape[0],
               "token_nll": (token_loss.loss_sum - token_loss.z_loss_sum)
                            / jnp.maximum(token_loss.token_count, 1.0),
               "grad_norm": optax.global_norm(grads)}
    return state.apply_gradients(grads, tx), metrics

  return step


def make_preference_step(config: t5.T5Config, tx: optax.GradientTransformation,
                         fmt: preference.PairFormat, *, max_input_length: int,
                         enable_dropout: bool = True) -> Callable:
  """Pairwise PM step with random order swapping (paper App. A.1, eq. 5)."""

  def step(state, batch: Batch):
    key = _dropout_key(state)
    swap_key, dropout_key = jax.random.split(key)
    first, second, label, _ = losses.random_order_swap(
        swap_key, batch["chosen"], batch["rejected"], batch["label"])
    inputs = preference.serialize_pair(batch["prompt"], first, second, fmt, max_input_length)

    def loss_fn(params):
      scores = preference.pair_score(params, config, fmt, inputs, enable_dropout=enable_dropout,
                                     dropout_rng=dropout_key)
      return jnp.mean(losses.pm_pairwise_loss(scores, label)), scores

    (loss, scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    predicted = preference.decide(scores)  # single-order prediction, for monitoring
    metrics = {"loss": loss,
               "accuracy": jnp.mean(preference.agreement(predicted, label)),
               "grad_norm": optax.global_norm(grads)}
    return state.apply_gradients(grads, tx), metrics

  return step


def make_align_step(config: t5.T5Config, tx: optax.GradientTransformation, loss: AlignLoss, *,
                    enable_dropout: bool = False) -> Callable:
  """THE alignment step (IPO / DPO / SLiC / Best-of-2), shared by every pair source.

  Gradients flow only through the policy's log-probs of the given tokens:
  sampled responses and reference log-probs are constants (no gradient
  through sampling).
  """

  def step(state, batch: Batch):
    batch_size = batch["chosen"].shape[0]
    prompts = jnp.concatenate([batch["prompt"], batch["prompt"]], axis=0)
    responses = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)  # [2B, T]
    label = batch.get("label")

    def loss_fn(params):
      logp = response_logprobs(params, config, prompts, responses, reduction=loss.reduction,
                               enable_dropout=enable_dropout, dropout_rng=_dropout_key(state))
      chosen, rejected = logp[:batch_size], logp[batch_size:]
      kwargs = dict(policy_chosen=chosen, policy_rejected=rejected,
                    ref_chosen=batch["ref_chosen"], ref_rejected=batch["ref_rejected"],
                    beta=loss.beta, label=label, ipo_convention=loss.ipo_convention)
      per_example = losses.pair_loss(loss.name, **kwargs)
      return jnp.mean(per_example), kwargs

    (value, kwargs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = losses.pair_metrics(loss.name, **kwargs)
    metrics["loss"] = value
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.apply_gradients(grads, tx), metrics

  return step
