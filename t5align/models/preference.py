"""Preference models on T5: pairwise P(y1 better than y2 | x), and a pointwise reward.

The pairwise model reads one serialised sequence

    <prompt> <MARKER_1> <response 1> <MARKER_2> <response 2> <SUFFIX> EOS

(the markers are token-id sequences of fixed words, see ``PairFormat``) and
runs a single decoder step from the start token. Its score is the logit
difference of two designated target tokens, ``s = logit["1"] - logit["2"]``,
so ``r(x, y1, y2) = sigmoid(s)`` is P(y1 better than y2), as in T5X's pairwise
models. Serialising at the token level (not by re-tokenising joined text) makes
labelling of sampled responses jittable and exactly reproducible.

The paper's decision rule, used for labelling and evaluation alike, removes
the position bias that online training would otherwise exploit:
y1 beats y2 iff ``r(x, y1, y2) - r(x, y2, y1) > 0``; exact ties count as 1/2.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from t5align.models import t5

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PairFormat:
  """Token ids that frame a serialised pair, and the two answer tokens.

  ``response_1_marker`` / ``response_2_marker`` are inserted before each
  response and ``suffix`` (e.g. a question) after the second; ``first_token``
  / ``second_token`` are the ids whose logits at the first decoder step score
  "response 1 is better" vs "response 2 is better". ``t5align.data.tasks``
  builds the format from a vocabulary; its text form is ``tasks.serialize_pair``.
  """
  response_1_marker: tuple[int, ...]
  response_2_marker: tuple[int, ...]
  first_token: int
  second_token: int
  suffix: tuple[int, ...] = ()


def _lengths(tokens: Array) -> Array:
  """Number of non-pad, non-EOS tokens in each row (rows are left-aligned)."""
  return jnp.sum((tokens != t5.PAD_ID) & (tokens != t5.EOS_ID), axis=-1)


def serialize_pair(prompt: Array, response_1: Array, response_2: Array, fmt: PairFormat,
                   max_length: int) -> Array:
  """Builds PM inputs ``[B, max_length]`` from left-aligned token rows.

  ``prompt [B, P]``, ``response_1 / response_2 [B, T]`` are padded with 0 and
  may end with EOS (dropped here; one EOS ends the serialised sequence).
  Truncation rule: responses are kept whole (they are already capped at the
  target length); the prompt gets the rest of the budget and is truncated from
  the left, keeping its latest tokens (for dialogues, the latest turns).

  Example with markers (90,) / (91,) and max_length 9:
    prompt [5, 6, 7, 8], y1 [20, 1, 0], y2 [30, 31, 1]
    -> 9 - 3 (markers, EOS) - 1 - 2 = 3 prompt tokens fit:
       [6, 7, 8, 90, 20, 91, 30, 31, 1]
  """
  fixed = (len(fmt.response_1_marker) + len(fmt.response_2_marker) + len(fmt.suffix)
           + 1)  # markers, suffix and EOS
  if response_1.shape[1] + response_2.shape[1] + fixed > max_length:
    raise ValueError(
        f"two responses of up to {response_1.shape[1]} and {response_2.shape[1]} tokens plus "
        f"{fixed} marker/EOS tokens do not fit in the preference-model input length "
        f"{max_length}; raise the input length or lower the target length")
  batch = prompt.shape[0]
  n1, n2 = _lengths(response_1), _lengths(response_2)
  budget = max_length - fixed - n1 - n2  # [B], >= 0 by the check above
  n_prompt_full = _lengths(prompt)
  n_prompt = jnp.minimum(n_prompt_full, budget)
  skip = n_prompt_full - n_prompt  # prompt tokens dropped from the left

  def constant(ids):
    return jnp.broadcast_to(jnp.asarray(ids, jnp.int32)[None, :], (batch, len(ids))), len(ids)

  # (tokens [B, W], count per row, first token taken) for each segment, in order.
  segments = [(prompt, n_prompt, skip)]
  for marker, response, n in ((fmt.response_1_marker, response_1, n1),
                              (fmt.response_2_marker, response_2, n2)):
    if marker:
      tokens, count = constant(marker)
      segments.append((tokens, count, 0))
    segments.append((response, n, 0))
  if fmt.suffix:
    tokens, count = constant(fmt.suffix)
    segments.append((tokens, count, 0))

  pos = jnp.arange(max_length)[None, :]  # [1, L]
  out = jnp.zeros((batch, max_length), jnp.int32)
  start = jnp.zeros((batch, 1), jnp.int32)
  for tokens, count, offset in segments:
    count = jnp.reshape(jnp.asarray(count, jnp.int32), (-1, 1))  # [B or 1, 1]
    offset = jnp.reshape(jnp.asarray(offset, jnp.int32), (-1, 1))
    index = jnp.clip(pos - start + offset, 0, tokens.shape[1] - 1)  # [B, L]
    values = jnp.take_along_axis(tokens, index, axis=1)
    out = jnp.where((pos >= start) & (pos < start + count), values, out)
    start = start + count
  return jnp.where(pos == start, t5.EOS_ID, out)


def serialize_single(prompt: Array, response: Array, fmt: PairFormat, max_length: int) -> Array:
  """Input of the pointwise reward model: prompt, marker 1, response, EOS."""
  empty = jnp.zeros((response.shape[0], 1), jnp.int32)
  no_marker = dataclasses.replace(fmt, response_2_marker=(), suffix=())
  return serialize_pair(prompt, response, empty, no_marker, max_length)


def _first_step_logits(params, config: t5.T5Config, inputs: Array, *, enable_dropout: bool,
                       dropout_rng=None) -> Array:
  """Float32 logits ``[B, V]`` of the first decoder step (input = start token)."""
  batch = inputs.shape[0]
  decoder_input = jnp.full((batch, 1), t5.DECODER_START_ID, jnp.int32)
  decoder_target = jnp.ones((batch, 1), jnp.int32)  # any non-pad id: marks the step valid
  rngs = {"dropout": dropout_rng} if enable_dropout else {}
  logits = t5.Transformer(config).apply({"params": params}, inputs, decoder_input, decoder_target,
                                        enable_dropout=enable_dropout, rngs=rngs)
  return logits[:, 0]


def pair_score(params, config: t5.T5Config, fmt: PairFormat, inputs: Array, *,
               enable_dropout: bool = False, dropout_rng=None) -> Array:
  """``s = logit[first] - logit[second]`` for serialised pairs; r = sigmoid(s)."""
  logits = _first_step_logits(params, config, inputs, enable_dropout=enable_dropout,
                              dropout_rng=dropout_rng)
  return logits[:, fmt.first_token] - logits[:, fmt.second_token]


def reward(params, config: t5.T5Config, fmt: PairFormat, inputs: Array, *,
           enable_dropout: bool = False, dropout_rng=None) -> Array:
  """Pointwise (Bradley-Terry) reward: the first-step logit of the ``first`` token."""
  logits = _first_step_logits(params, config, inputs, enable_dropout=enable_dropout,
                              dropout_rng=dropout_rng)
  return logits[:, fmt.first_token]


def symmetric_preference(params, config: t5.T5Config, fmt: PairFormat, prompt: Array,
                         response_1: Array, response_2: Array, max_length: int) -> dict:
  """Scores both orders; returns r12, r21 and the decision-rule margin r12 - r21.

  ``r12 = r(x, y1, y2)`` and ``r21 = r(x, y2, y1)``; both orders run as one
  batch of ``2B`` rows.
  """
  first = serialize_pair(prompt, response_1, response_2, fmt, max_length)
  second = serialize_pair(prompt, response_2, response_1, fmt, max_length)
  scores = pair_score(params, config, fmt, jnp.concatenate([first, second], axis=0))
  r = jax.nn.sigmoid(scores)
  r12, r21 = jnp.split(r, 2)
  return {"r12": r12, "r21": r21, "margin": r12 - r21}


def decide(margin: Array) -> Array:
  """Decision-rule label P(y1 preferred): 1 if margin > 0, 0 if < 0, 1/2 on a tie."""
  return jnp.where(margin > 0, 1.0, jnp.where(margin < 0, 0.0, 0.5)).astype(jnp.float32)


def agreement(predicted_label: Array, label: Array) -> Array:
  """Per-example agreement with a (possibly soft) reference label.

  Hard predictions against hard labels give accuracy (1/2 for ties); against
  soft labels this is the expected agreement, p*pred + (1-p)*(1-pred).
  """
  return label * predicted_label + (1.0 - label) * (1.0 - predicted_label)


def sequences_of(token_rows: Sequence[Sequence[int]], width: int) -> Array:
  """Left-aligned int32 ``[len(rows), width]`` array from lists of ids (pad 0)."""
  out = jnp.zeros((len(token_rows), width), jnp.int32)
  for i, row in enumerate(token_rows):
    if len(row) > width:
      raise ValueError(f"row {i} has {len(row)} tokens, more than the width {width}")
    out = out.at[i, :len(row)].set(jnp.asarray(row, jnp.int32))
  return out
