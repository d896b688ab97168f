"""Sampling from, scoring with, and measuring the KL between T5 policies.

Three jobs, all jitted and all in float32 where probabilities are involved:

* ``sample``: ancestral sampling with the decoder's explicit KV cache
  (``t5.Transformer.init_decode_cache`` / ``decode_step``). The encoder and
  the cross-attention K/V run once per prompt; the resulting cache rows are
  repeated for the ``num_samples`` draws of that prompt. A
  ``jax.lax.while_loop`` stops as soon as every row has emitted EOS.
* ``token_logprobs`` / ``sequence_logprobs``: teacher-forced scoring with raw
  temperature-1 logits and dropout off (T5X's ``score_batch``). Training and
  evaluation use these, never the sampler's numbers (see below).
* ``per_token_kl``: the paper's KL estimator (App. D): for a sample ``y``,
  the sum over its tokens of the exact KL between the two full next-token
  distributions given the same prefix.

Sampler output layout, worked example (pad = 0, EOS = 1). Two prompts,
``num_samples=2``, ``max_decode_length=4``::

  tokens  = [[5, 9, 1, 0],    # prompt 0, sample 0: length 3 (EOS included)
             [7, 1, 0, 0],    # prompt 0, sample 1: length 2
             [4, 4, 4, 4],    # prompt 1, sample 0: no EOS, truncated, length 4
             [8, 1, 0, 0]]    # prompt 1, sample 1: length 2

Prompt ``i``'s samples are rows ``i*n .. i*n+n-1``. Positions after EOS are 0
and their log-probs are 0.

Two kinds of log-probs come back, because conflating them is a classic bug
(log-probs "under temperature" used as policy log-probs):

* ``policy_log_probs``: ``log_softmax(raw logits)[token]``, the policy itself
  at temperature 1 with nothing truncated. Scoring the sample with
  ``token_logprobs`` gives the same numbers (up to float rounding).
* ``sampling_log_probs``: the log-prob of the token under the distribution it
  was actually drawn from (after the processing below); 0 for greedy.

Processing of the next-token logits, in this order:

1. token 0 (pad / decoder start) is never emitted: a 0 inside a response would
   be read as padding by scoring, losses and attention masks;
2. EOS is masked for the first ``min_decode_length`` positions (benchmarks use
   this to force a fixed response length, like HF ``min_new_tokens``);
3. ``temperature == 0`` picks the argmax (greedy); otherwise logits are divided
   by the temperature;
4. ``top_k > 0`` keeps the tokens with fewer than ``k`` strictly larger logits
   (ties at the boundary are all kept);
5. ``top_p < 1`` keeps the tokens whose strictly more probable tokens have
   total probability below ``p``, measured on the distribution left by steps
   1-4 (so top-k and top-p may be combined: top-p then acts on the
   renormalised top-k distribution, as in Hugging Face's warper order).

Drawing and RNG: the token of row ``r`` at step ``t`` uses two uniforms
``jax.random.uniform(fold_in(fold_in(rng, t), r), (2,))``: the first picks a
block of 128 consecutive token ids by inverse CDF over the block masses, the
second a token inside that block by inverse CDF (see ``_inverse_cdf_draw``).
A run is therefore reproducible, and a row's draws do not depend on how many
rows share the batch, nor on how the batch is sharded over a mesh (called
under ``jax.set_mesh`` with batch-sharded prompts, the sampler runs data
parallel and returns the same tokens as on one device).
"""

import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from t5align import losses
from t5align.models import t5

Array = jax.Array
Params = Any
_BLOCK = 128  # tokens per block of the two-level inverse-CDF draw


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static settings of one compiled sampler (see the module docstring)."""
  num_samples: int = 1
  max_decode_length: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_decode_length: int = 0

  def __post_init__(self):
    if not isinstance(self.num_samples, int) or self.num_samples < 1:
      raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
    if not isinstance(self.max_decode_length, int) or self.max_decode_length < 1:
      raise ValueError("max_decode_length must be a positive integer, got "
                       f"{self.max_decode_length!r}")
    if (not isinstance(self.min_decode_length, int)
        or not 0 <= self.min_decode_length <= self.max_decode_length):
      raise ValueError("min_decode_length must be an integer in [0, max_decode_length="
                       f"{self.max_decode_length}], got {self.min_decode_length!r}")
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@flax.struct.dataclass
class SampleOutput:
  """What ``sample`` returns; ``N = batch * num_samples`` rows grouped per prompt."""
  tokens: Array              # [N, L] int32; 0 after EOS
  lengths: Array             # [N] int32; position of EOS + 1, or L without EOS
  policy_log_probs: Array    # [N, L] float32; raw temperature-1 log-probs, 0 after EOS
  sampling_log_probs: Array  # [N, L] float32; under the processed distribution
  num_steps: Array           # int32 scalar; decoder steps actually run (<= L)


def _top_k_mask(logits: Array, k: int) -> Array:
  if k >= logits.shape[-1]:
    return logits
  kth_largest = jax.lax.top_k(logits, k)[0][:, -1:]  # [N, 1]
  return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def _top_p_mask(logits: Array, p: float) -> Array:
  descending = -jnp.sort(-logits, axis=-1)  # [N, V]
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # The smallest kept logit; everything tied with it is kept as well, which
  # makes the rule "P(strictly more probable tokens) < p" exactly.
  threshold = jnp.min(jnp.where(mass_before < p, descending, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _processed_logits(logits: Array, step: Array, sampling: SamplingConfig) -> Array:
  """Steps 1-5 of the module docstring (without the greedy argmax)."""
  vocab = jnp.arange(logits.shape[-1])
  banned = vocab == t5.PAD_ID
  if sampling.min_decode_length:
    banned = banned | ((vocab == t5.EOS_ID) & (step < sampling.min_decode_length))
  logits = jnp.where(banned[None, :], -jnp.inf, logits)
  if sampling.greedy:
    return logits
  if sampling.temperature != 1.0:
    logits = logits / sampling.temperature
  if sampling.top_k:
    logits = _top_k_mask(logits, sampling.top_k)
  if sampling.top_p < 1.0:
    logits = _top_p_mask(logits, sampling.top_p)
  return logits


def _pick(weights: Array, u: Array) -> Array:
  """First index whose cumulative weight exceeds ``u * total``: ``[N, K], [N] -> [N]``.

  Never returns a zero-weight index: the cumulative sum only grows at positive
  weights, and ``u * total`` rounding up to ``total`` falls back to the last
  positive weight.
  """
  cumulative = jnp.cumsum(weights, axis=-1)
  total = cumulative[:, -1:]
  index = jnp.sum(cumulative <= u[:, None] * total, axis=-1)
  last_positive = jnp.sum(cumulative < total, axis=-1)
  return jnp.minimum(index, last_positive)


def _inverse_cdf_draw(probs: Array, uniforms: Array) -> Array:
  """Token ids ``[N]`` drawn from unnormalised ``probs [N, V]`` with ``uniforms [N, 2]``.

  Two levels: a block of ``_BLOCK`` tokens with ``uniforms[:, 0]`` over the
  block masses, then a token within it with ``uniforms[:, 1]``. This is exact
  conditional sampling; splitting keeps each cumulative sum short, so float32
  rounding and the 2**-23 resolution of a uniform bias a draw by at most
  ~(blocks + _BLOCK) * 2**-23 in total variation (~5e-5 for 32128 tokens).
  Compared with Gumbel-max (``jax.random.categorical``) it needs 2 random
  numbers per row instead of V (Gumbel noise was ~20% of CPU sampling time
  at batch 16 with 32128 tokens; see docs/benchmarks.md).
  """
  rows, vocab = probs.shape
  blocks = -(-vocab // _BLOCK)
  padded = jnp.pad(probs, ((0, 0), (0, blocks * _BLOCK - vocab)))
  padded = padded.reshape(rows, blocks, _BLOCK)  # [N, blocks, block]
  block = _pick(jnp.sum(padded, axis=-1), uniforms[:, 0])
  within = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]  # [N, block]
  return block * _BLOCK + _pick(within, uniforms[:, 1])


def _choose(logits: Array, step: Array, rng: Array,
            sampling: SamplingConfig) -> tuple[Array, Array, Array]:
  """Next tokens [N] with their policy and sampling log-probs from raw logits [N, V]."""
  processed = _processed_logits(logits, step, sampling)
  if sampling.greedy:
    token = jnp.argmax(processed, axis=-1)
    sampling_lp = jnp.zeros(token.shape, jnp.float32)
  else:
    step_key = jax.random.fold_in(rng, step)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        step_key, jnp.arange(logits.shape[0]))
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(row_keys)  # [N, 2]
    shifted = processed - jnp.max(processed, axis=-1, keepdims=True)
    probs = jnp.exp(shifted)  # unnormalised; 0 at excluded tokens
    token = _inverse_cdf_draw(probs, uniforms)
    sampling_lp = (jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0]
                   - jnp.log(jnp.sum(probs, axis=-1)))
  policy_lp = (jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
               - jax.nn.logsumexp(logits, axis=-1))
  return token.astype(jnp.int32), policy_lp, sampling_lp


def _repeat_rows(tree: Any, n: int) -> Any:
  # Row i of the input becomes rows i*n .. i*n+n-1; scalars (the cache index) stay.
  if n == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else x, tree)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def _sample(params: Params, encoder_input_tokens: Array, rng: Array, *, config: t5.T5Config,
            sampling: SamplingConfig) -> SampleOutput:
  model = t5.Transformer(config)
  variables = {"params": params}
  encoded = model.apply(variables, encoder_input_tokens, method="encode")  # [B, S, E]
  cache = model.apply(variables, encoded, encoder_input_tokens, sampling.max_decode_length,
                      method="init_decode_cache")
  cache = _repeat_rows(cache, sampling.num_samples)
  rows = encoder_input_tokens.shape[0] * sampling.num_samples
  length = sampling.max_decode_length

  def cond(state):
    step, _, _, done, _, _, _ = state
    return (step < length) & ~jnp.all(done)

  def body(state):
    step, previous, cache, done, tokens, policy_lps, sampling_lps = state
    logits, cache = model.apply(variables, previous, cache, method="decode_step")  # [N, V]
    token, policy_lp, sampling_lp = _choose(logits, step, rng, sampling)
    token = jnp.where(done, t5.PAD_ID, token)
    policy_lp = jnp.where(done, 0.0, policy_lp)
    sampling_lp = jnp.where(done, 0.0, sampling_lp)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    policy_lps = jax.lax.dynamic_update_slice_in_dim(policy_lps, policy_lp[:, None], step, axis=1)
    sampling_lps = jax.lax.dynamic_update_slice_in_dim(
        sampling_lps, sampling_lp[:, None], step, axis=1)
    done = done | (token == t5.EOS_ID)
    return step + 1, token, cache, done, tokens, policy_lps, sampling_lps

  state = (jnp.zeros((), jnp.int32),
           jnp.full((rows,), t5.DECODER_START_ID, jnp.int32),
           cache,
           jnp.zeros((rows,), bool),
           jnp.zeros((rows, length), jnp.int32),
           jnp.zeros((rows, length), jnp.float32),
           jnp.zeros((rows, length), jnp.float32))
  num_steps, _, _, done, tokens, policy_lps, sampling_lps = jax.lax.while_loop(cond, body, state)
  first_eos = jnp.argmax(tokens == t5.EOS_ID, axis=1)
  lengths = jnp.where(done, first_eos + 1, length).astype(jnp.int32)
  return SampleOutput(tokens=tokens, lengths=lengths, policy_log_probs=policy_lps,
                      sampling_log_probs=sampling_lps, num_steps=num_steps)


def sample(params: Params, encoder_input_tokens: Array, *, config: t5.T5Config, rng: Array,
           num_samples: int = 1, max_decode_length: int = 128, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, min_decode_length: int = 0) -> SampleOutput:
  """Draws ``num_samples`` responses per prompt; see the module docstring.

  Args:
    params: T5 parameters (plain nested dict, T5X names).
    encoder_input_tokens: int ``[batch, src_len]`` prompts, 0-padded.
    config: the network's ``T5Config`` (static).
    rng: a JAX PRNG key.
    num_samples: i.i.d. draws per prompt (rows grouped per prompt).
    max_decode_length: number of target positions; rows without EOS are truncated here.
    temperature: 0 = greedy argmax; the paper's default is 1.
    top_k: 0 = off. Unlike T5X's ``temperature_sample`` the default is real sampling.
    top_p: 1 = off.
    min_decode_length: EOS cannot be among the first ``min_decode_length`` tokens.

  Returns:
    ``SampleOutput`` with ``batch * num_samples`` rows. Each distinct set of the
    static arguments (and input shape) compiles once.
  """
  if encoder_input_tokens.ndim != 2 or not jnp.issubdtype(encoder_input_tokens.dtype, jnp.integer):
    raise ValueError("encoder_input_tokens must be an integer array [batch, src_len], got "
                     f"{encoder_input_tokens.dtype}{list(encoder_input_tokens.shape)}")
  sampling = SamplingConfig(num_samples=num_samples, max_decode_length=max_decode_length,
                            temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                            min_decode_length=min_decode_length)
  return _sample(params, encoder_input_tokens, rng, config=config, sampling=sampling)


def _check_targets(encoder_input_tokens: Array, targets: Array) -> None:
  for name, x in (("encoder_input_tokens", encoder_input_tokens),
                  ("decoder_target_tokens", targets)):
    if x.ndim != 2:
      raise ValueError(f"{name} must be [batch, length], got shape {list(x.shape)}")
  if encoder_input_tokens.shape[0] != targets.shape[0]:
    raise ValueError(f"batch mismatch: encoder_input_tokens has {encoder_input_tokens.shape[0]} "
                     f"rows, decoder_target_tokens {targets.shape[0]}")


def _teacher_forced_logits(params: Params, encoder_input_tokens: Array, targets: Array,
                           config: t5.T5Config) -> Array:
  """Raw float32 logits ``[B, T, V]``, dropout off."""
  return t5.Transformer(config).apply(
      {"params": params}, encoder_input_tokens, t5.shift_right(targets), targets,
      enable_dropout=False).astype(jnp.float32)


def kl_from_logits(logits: Array, ref_logits: Array, targets: Array) -> Array:
  """Sum over non-pad target positions of KL(softmax(logits) || softmax(ref_logits)): ``[B]``."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, T]
  return jnp.sum(jnp.where(targets != t5.PAD_ID, kl, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def _token_logprobs(params, encoder_input_tokens, targets, *, config):
  logits = _teacher_forced_logits(params, encoder_input_tokens, targets, config)
  return jnp.where(targets != t5.PAD_ID, losses.token_logprobs(logits, targets), 0.0)


def token_logprobs(params: Params, encoder_input_tokens: Array, decoder_target_tokens: Array, *,
                   config: t5.T5Config) -> Array:
  """Per-token log-probs ``[B, T]`` of the targets (EOS included, 0 at padding)."""
  _check_targets(encoder_input_tokens, decoder_target_tokens)
  return _token_logprobs(params, encoder_input_tokens, decoder_target_tokens, config=config)


def sequence_logprobs(params: Params, encoder_input_tokens: Array, decoder_target_tokens: Array,
                      *, config: t5.T5Config, reduction: str = "sum") -> Array:
  """Sequence log-probs ``[B]``: ``'sum'`` (the paper's) or ``'mean'`` over non-pad tokens.

  The reduction is ``losses.sequence_logprob``'s, so scoring and the losses
  share one definition.
  """
  if reduction not in losses.REDUCTIONS:
    raise ValueError(f"reduction must be one of {losses.REDUCTIONS}, got {reduction!r}")
  per_token = token_logprobs(params, encoder_input_tokens, decoder_target_tokens, config=config)
  return losses.sequence_logprob(per_token, decoder_target_tokens != t5.PAD_ID,
                                 reduction=reduction)


@functools.partial(jax.jit, static_argnames=("config", "ref_config"))
def _per_token_kl(params, ref_params, encoder_input_tokens, targets, *, config, ref_config):
  logits = _teacher_forced_logits(params, encoder_input_tokens, targets, config)
  ref_logits = _teacher_forced_logits(ref_params, encoder_input_tokens, targets, ref_config)
  return kl_from_logits(logits, ref_logits, targets)


def per_token_kl(params: Params, ref_params: Params, encoder_input_tokens: Array,
                 targets: Array, *, config: t5.T5Config,
                 ref_config: Optional[t5.T5Config] = None) -> Array:
  """The paper's KL estimate per sample ``[B]`` (float32).

  ``sum_t sum_v pi(v|x,y<t) [log pi(v|x,y<t) - log pi_ref(v|x,y<t)]`` over the
  non-pad positions of ``targets`` (EOS included), with raw temperature-1
  distributions over the full vocabulary. Averaged over samples ``y ~ pi``
  this is an unbiased estimate of the sequence-level KL(pi || pi_ref).
  """
  _check_targets(encoder_input_tokens, targets)
  ref_config = config if ref_config is None else ref_config
  if ref_config.vocab_size != config.vocab_size:
    raise ValueError(f"KL needs one vocabulary: policy vocab_size={config.vocab_size}, "
                     f"reference vocab_size={ref_config.vocab_size}")
  return _per_token_kl(params, ref_params, encoder_input_tokens, targets, config=config,
                       ref_config=ref_config)
