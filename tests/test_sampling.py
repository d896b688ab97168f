"""Tests of t5align.sampling against independent references.

References used here: a slow sampler that recomputes the full teacher-forced
logits at every step (no cache) and applies pad/EOS masking, temperature,
top-k and top-p in numpy from their definitions; brute-force numpy KL sums;
the model's own next-token probabilities for a chi-square goodness-of-fit test.
Only ``jax.random.uniform`` and the documented key derivation
``fold_in(fold_in(rng, step), row)`` are shared with the code under test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from t5align import sampling
from t5align.models import t5

CONFIG = t5.T5Config(vocab_size=200, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=64,
                     num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
NUM_SAMPLES = 4
MAX_LEN = 10
PROMPTS = np.array([[5, 6, 7, 9, 11, 1, 0, 0],
                    [8, 9, 1, 0, 0, 0, 0, 0],
                    [3, 4, 5, 6, 7, 8, 9, 1]], np.int32)
PROMPTS_REPEATED = np.repeat(PROMPTS, NUM_SAMPLES, axis=0)  # rows grouped per prompt
RNG = jax.random.key(1)

SETTINGS = {
    "temperature_1": {},
    "greedy": {"temperature": 0.0},
    "top_k": {"top_k": 5},
    "top_p": {"top_p": 0.8},
    "combined": {"temperature": 0.7, "top_k": 10, "top_p": 0.9},
}


_init_params = jax.jit(functools.partial(t5.init_params, CONFIG))


def _with_eos_bias(params, embedding_shift, eos_weight):
  """A model whose EOS logit grows with ``eos_weight``.

  Shifting every embedding along dimension 0 makes that dimension dominate the
  decoder's final RMSNorm output (always positive), so the EOS column of
  ``logits_dense`` at that row acts like a bias on the EOS logit.
  """
  params = jax.tree.map(lambda x: x, params)
  params["token_embedder"]["embedding"] = (
      params["token_embedder"]["embedding"].at[:, 0].add(embedding_shift))
  params["decoder"]["logits_dense"]["kernel"] = (
      params["decoder"]["logits_dense"]["kernel"].at[0, t5.EOS_ID].set(eos_weight))
  return params


@pytest.fixture(scope="module")
def params():
  return _init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def eos_prone_params(params):
  # Mixed outcomes within MAX_LEN: some rows end after 1-5 tokens, some never.
  return _with_eos_bias(params, 20.0, 1.0)


@pytest.fixture(scope="module")
def eos_certain_params(params):
  return _with_eos_bias(params, 1000.0, 100.0)


@functools.partial(jax.jit, static_argnames=("config",))
def _full_logits(params, encoder_input_tokens, decoder_input_tokens, targets, *, config=CONFIG):
  return t5.Transformer(config).apply({"params": params}, encoder_input_tokens,
                                      decoder_input_tokens, targets)


def _teacher_forced_logits(params, targets, prompts=PROMPTS_REPEATED):
  targets = jnp.asarray(targets)
  return np.asarray(_full_logits(params, jnp.asarray(prompts), t5.shift_right(targets), targets),
                    np.float64)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
  z = np.exp(x - m)
  return x - m - np.log(np.sum(z, axis=-1, keepdims=True))


def _reference_processed(logits, step, *, temperature=1.0, top_k=0, top_p=1.0,
                         min_decode_length=0):
  """The documented processing, from the definitions, row by row in numpy."""
  x = np.array(logits, np.float32)
  x[:, t5.PAD_ID] = -np.inf
  if step < min_decode_length:
    x[:, t5.EOS_ID] = -np.inf
  if temperature == 0.0:
    return x
  x = x / np.float32(temperature)
  for row in x:
    if top_k:
      strictly_larger = np.sum(row[None, :] > row[:, None], axis=1)
      row[strictly_larger >= top_k] = -np.inf
    if top_p < 1.0:
      probs = np.exp(_log_softmax(row))
      mass_larger = np.sum(np.where(row[None, :] > row[:, None], probs[None, :], 0.0), axis=1)
      row[mass_larger >= top_p] = -np.inf
  return x


def _reference_draw(processed_row, uniforms, block=128):
  """The documented two-level inverse-CDF draw, in float64."""
  probs = np.exp(_log_softmax(processed_row))
  probs = np.pad(probs, (0, -len(probs) % block)).reshape(-1, block)
  masses = np.cumsum(probs.sum(axis=1))
  b = np.searchsorted(masses, uniforms[0] * masses[-1], side="right")
  within = np.cumsum(probs[b])
  return b * block + np.searchsorted(within, uniforms[1] * within[-1], side="right")


def _reference_sample(params, rng, *, temperature=1.0, top_k=0, top_p=1.0,
                      min_decode_length=0):
  """Uncached sampler: full teacher-forced logits recomputed at every step."""
  rows = PROMPTS_REPEATED.shape[0]
  tokens = np.zeros((rows, MAX_LEN), np.int32)
  policy_lps = np.zeros((rows, MAX_LEN))
  sampling_lps = np.zeros((rows, MAX_LEN))
  done = np.zeros(rows, bool)
  steps = 0
  for step in range(MAX_LEN):
    if done.all():
      break
    steps += 1
    targets = tokens.copy()
    targets[:, step] = 2  # any non-pad id: keeps the query at `step` unmasked
    raw = _teacher_forced_logits(params, targets)[:, step]  # [N, V]
    processed = _reference_processed(raw, step, temperature=temperature, top_k=top_k,
                                     top_p=top_p, min_decode_length=min_decode_length)
    if temperature == 0.0:
      token = np.argmax(processed, axis=-1)
      sampling_lp = np.zeros(rows)
    else:
      step_key = jax.random.fold_in(rng, step)
      uniforms = np.asarray(jax.vmap(lambda r: jax.random.uniform(
          jax.random.fold_in(step_key, r), (2,)))(jnp.arange(rows)), np.float64)
      token = np.array([_reference_draw(p, u) for p, u in zip(processed, uniforms)])
      sampling_lp = _log_softmax(processed)[np.arange(rows), token]
    policy_lp = _log_softmax(raw)[np.arange(rows), token]
    tokens[:, step] = np.where(done, 0, token)
    policy_lps[:, step] = np.where(done, 0.0, policy_lp)
    sampling_lps[:, step] = np.where(done, 0.0, sampling_lp)
    done |= tokens[:, step] == t5.EOS_ID
  return tokens, policy_lps, sampling_lps, steps


def _sample(params, **settings):
  return sampling.sample(params, jnp.asarray(PROMPTS), config=CONFIG, rng=RNG,
                         num_samples=NUM_SAMPLES, max_decode_length=MAX_LEN, **settings)


def _expected_lengths(tokens):
  tokens = np.asarray(tokens)
  has_eos = (tokens == t5.EOS_ID).any(axis=1)
  return np.where(has_eos, np.argmax(tokens == t5.EOS_ID, axis=1) + 1, tokens.shape[1])


def _check_layout(out):
  tokens = np.asarray(out.tokens)
  lengths = np.asarray(out.lengths)
  np.testing.assert_array_equal(lengths, _expected_lengths(tokens))
  positions = np.arange(MAX_LEN)[None, :]
  inside = positions < lengths[:, None]
  assert (tokens[inside] != 0).all(), "pad emitted inside a response"
  assert (tokens[~inside] == 0).all()
  assert (np.asarray(out.policy_log_probs)[~inside] == 0).all()
  assert (np.asarray(out.sampling_log_probs)[~inside] == 0).all()
  assert int(out.num_steps) == lengths.max()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_cached_sampler_matches_uncached_reference(name, params, eos_prone_params):
  settings = SETTINGS[name]
  for p in (params, eos_prone_params):
    out = _sample(p, **settings)
    tokens, policy_lps, sampling_lps, steps = _reference_sample(p, RNG, **settings)
    np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
    np.testing.assert_allclose(np.asarray(out.policy_log_probs), policy_lps, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.sampling_log_probs), sampling_lps, atol=2e-5)
    assert int(out.num_steps) == steps
    _check_layout(out)
  if name == "temperature_1":  # the EOS-prone model really mixes finished and truncated rows
    lengths = np.asarray(_sample(eos_prone_params).lengths)
    assert lengths.min() < MAX_LEN and lengths.max() == MAX_LEN


def test_greedy_is_teacher_forced_argmax(params, eos_prone_params):
  for p in (params, eos_prone_params):
    out = _sample(p, temperature=0.0)
    tokens = np.asarray(out.tokens)
    logits = _teacher_forced_logits(p, tokens)
    logits[..., t5.PAD_ID] = -np.inf
    valid = tokens != 0
    np.testing.assert_array_equal(np.argmax(logits, axis=-1)[valid], tokens[valid])
    # All samples of one prompt are identical under greedy decoding.
    grouped = tokens.reshape(len(PROMPTS), NUM_SAMPLES, MAX_LEN)
    assert (grouped == grouped[:, :1]).all()


@pytest.mark.parametrize("name", ["top_k", "top_p", "combined"])
def test_truncation_never_emits_excluded_tokens(name, params):
  settings = SETTINGS[name]
  temperature = settings.get("temperature", 1.0)
  out = _sample(params, **settings)
  tokens = np.asarray(out.tokens)
  logits = _teacher_forced_logits(params, tokens)
  logits[..., t5.PAD_ID] = -np.inf
  scaled = logits / temperature  # [N, L, V]
  chosen = np.take_along_axis(scaled, tokens[..., None], axis=-1)  # [N, L, 1]
  larger = scaled > chosen
  valid = tokens != 0
  if "top_k" in settings:
    assert (np.sum(larger, axis=-1)[valid] < settings["top_k"]).all()
  if "top_p" in settings:
    probs = np.exp(_log_softmax(scaled))
    if "top_k" in settings:  # top-p acts on the renormalised top-k distribution
      kth = -np.sort(-scaled, axis=-1)[..., settings["top_k"] - 1: settings["top_k"]]
      probs = np.where(scaled >= kth, probs, 0.0)
      probs /= probs.sum(axis=-1, keepdims=True)
    mass_larger = np.sum(np.where(larger, probs, 0.0), axis=-1)
    assert (mass_larger[valid] < settings["top_p"] + 1e-6).all()
  # Without truncation the same draws would have left the allowed set.
  untruncated = np.asarray(_sample(params).tokens)
  u_logits = _teacher_forced_logits(params, untruncated)
  u_chosen = np.take_along_axis(u_logits, untruncated[..., None], axis=-1)
  assert (np.sum(u_logits > u_chosen, axis=-1)[untruncated != 0] >= 10).any()


def test_first_step_frequencies_match_model_probabilities(params):
  draws_per_prompt = 10_000
  prompts = jnp.asarray(PROMPTS[:2])
  out = sampling.sample(params, prompts, config=CONFIG, rng=jax.random.key(7),
                        num_samples=draws_per_prompt, max_decode_length=1)
  first = np.asarray(out.tokens)[:, 0].reshape(2, draws_per_prompt)
  targets = np.full((2, 1), 2, np.int32)
  logits = _teacher_forced_logits(params, targets, prompts=PROMPTS[:2])[:, 0]  # [2, V]
  logits[:, t5.PAD_ID] = -np.inf

  def chi_square(counts, probs):
    # Tokens expected fewer than 5 times are pooled into one cell (pad is never drawn).
    expected = draws_per_prompt * probs
    small = (expected < 5) & (np.arange(len(probs)) != t5.PAD_ID)
    cells_observed = np.append(counts[expected >= 5], counts[small].sum())
    cells_expected = np.append(expected[expected >= 5], expected[small].sum())
    return (np.sum((cells_observed - cells_expected) ** 2 / cells_expected),
            len(cells_expected) - 1)

  for i in range(2):
    counts = np.bincount(first[i], minlength=CONFIG.vocab_size).astype(np.float64)
    assert counts[t5.PAD_ID] == 0
    probs = np.exp(_log_softmax(logits[i]))
    statistic, dof = chi_square(counts, probs)
    # Under the null the statistic is chi-square(dof); a 1e-6 false-alarm level.
    threshold = scipy.stats.chi2.ppf(1.0 - 1e-6, dof)
    assert statistic < threshold, (statistic, threshold)
    # The test has power: the same counts reject the temperature-0.7 distribution.
    wrong = np.exp(_log_softmax(logits[i] / 0.7))
    assert chi_square(counts, wrong)[0] > threshold


@pytest.mark.parametrize("name", ["temperature_1", "combined"])
def test_scoring_reproduces_sampler_policy_log_probs(name, eos_prone_params):
  out = _sample(eos_prone_params, **SETTINGS[name])
  prompts = jnp.asarray(PROMPTS_REPEATED)
  scored = sampling.token_logprobs(eos_prone_params, prompts, out.tokens, config=CONFIG)
  np.testing.assert_allclose(np.asarray(scored), np.asarray(out.policy_log_probs), atol=2e-5)
  total = sampling.sequence_logprobs(eos_prone_params, prompts, out.tokens, config=CONFIG)
  np.testing.assert_allclose(np.asarray(total), np.asarray(out.policy_log_probs).sum(1),
                             atol=1e-4)
  mean = sampling.sequence_logprobs(eos_prone_params, prompts, out.tokens, config=CONFIG,
                                    reduction="mean")
  np.testing.assert_allclose(np.asarray(mean), np.asarray(total) / np.asarray(out.lengths),
                             rtol=1e-6)
  if name == "combined":  # the sampler's own distribution is a different one
    assert not np.allclose(np.asarray(out.sampling_log_probs), np.asarray(out.policy_log_probs),
                           atol=1e-2)


def test_early_exit_and_min_decode_length(eos_prone_params, eos_certain_params):
  out = _sample(eos_certain_params)
  assert int(out.num_steps) == 1
  np.testing.assert_array_equal(np.asarray(out.lengths), 1)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], t5.EOS_ID)
  _check_layout(out)

  out = _sample(eos_certain_params, min_decode_length=3)
  assert int(out.num_steps) == 4
  np.testing.assert_array_equal(np.asarray(out.lengths), 4)
  _check_layout(out)
  tokens, _, sampling_lps, _ = _reference_sample(eos_certain_params, RNG, min_decode_length=3)
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  np.testing.assert_allclose(np.asarray(out.sampling_log_probs), sampling_lps, atol=2e-5)

  out = _sample(eos_prone_params, min_decode_length=3)
  _check_layout(out)
  tokens = np.asarray(out.tokens)
  assert not (tokens[:, :3] == t5.EOS_ID).any()
  assert (tokens[:, 3:] == t5.EOS_ID).any()


def test_same_draws_without_jit(eos_prone_params):
  jitted = _sample(eos_prone_params)
  with jax.disable_jit():  # the eager scoring path is covered by the KL test
    eager = _sample(eos_prone_params)
  np.testing.assert_array_equal(np.asarray(eager.tokens), np.asarray(jitted.tokens))
  np.testing.assert_allclose(np.asarray(eager.policy_log_probs),
                             np.asarray(jitted.policy_log_probs), atol=2e-5)
  np.testing.assert_allclose(np.asarray(eager.sampling_log_probs),
                             np.asarray(jitted.sampling_log_probs), atol=2e-5)
  assert int(eager.num_steps) == int(jitted.num_steps)


def test_row_draws_do_not_depend_on_batch_composition(params):
  both = _sample(params)
  first_only = sampling.sample(params, jnp.asarray(PROMPTS[:1]), config=CONFIG, rng=RNG,
                               num_samples=NUM_SAMPLES, max_decode_length=MAX_LEN)
  np.testing.assert_array_equal(np.asarray(first_only.tokens),
                                np.asarray(both.tokens)[:NUM_SAMPLES])


def _brute_force_kl(logits, ref_logits, targets):
  log_p, log_q = _log_softmax(logits), _log_softmax(ref_logits)
  total = np.zeros(targets.shape[0])
  for b in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      if targets[b, t] != 0:
        for v in range(logits.shape[-1]):
          total[b] += np.exp(log_p[b, t, v]) * (log_p[b, t, v] - log_q[b, t, v])
  return total


def test_kl_zero_for_identical_params_and_matches_brute_force(params, eos_prone_params):
  targets = np.asarray(_sample(eos_prone_params).tokens)  # varied lengths, padded tails
  prompts = jnp.asarray(PROMPTS_REPEATED)
  same = sampling.per_token_kl(eos_prone_params, eos_prone_params, prompts, targets,
                               config=CONFIG)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)

  ref_params = _init_params(jax.random.key(3))
  kl = np.asarray(sampling.per_token_kl(eos_prone_params, ref_params, prompts, targets,
                                        config=CONFIG))
  expected = _brute_force_kl(_teacher_forced_logits(eos_prone_params, targets),
                             _teacher_forced_logits(ref_params, targets), targets)
  assert (expected > 0).all()
  np.testing.assert_allclose(kl, expected, rtol=1e-4)

  with jax.disable_jit():
    eager = sampling.per_token_kl(eos_prone_params, ref_params, prompts, targets, config=CONFIG)
  np.testing.assert_allclose(np.asarray(eager), kl, rtol=1e-5)


def test_kl_and_scores_ignore_extra_padding(params, eos_prone_params):
  targets = np.asarray(_sample(eos_prone_params).tokens)
  padded = np.pad(targets, ((0, 0), (0, 6)))
  prompts = jnp.asarray(PROMPTS_REPEATED)
  ref_params = _init_params(jax.random.key(3))
  kl = sampling.per_token_kl(eos_prone_params, ref_params, prompts, targets, config=CONFIG)
  kl_padded = sampling.per_token_kl(eos_prone_params, ref_params, prompts, padded, config=CONFIG)
  np.testing.assert_allclose(np.asarray(kl_padded), np.asarray(kl), rtol=1e-5)
  scores = sampling.token_logprobs(eos_prone_params, prompts, targets, config=CONFIG)
  scores_padded = sampling.token_logprobs(eos_prone_params, prompts, padded, config=CONFIG)
  np.testing.assert_allclose(np.asarray(scores_padded)[:, :MAX_LEN], np.asarray(scores),
                             atol=1e-5)
  assert (np.asarray(scores_padded)[:, MAX_LEN:] == 0).all()
  np.testing.assert_allclose(
      np.asarray(sampling.sequence_logprobs(eos_prone_params, prompts, padded, config=CONFIG)),
      np.asarray(scores).sum(1), atol=1e-4)


def test_bad_arguments_raise(params):
  prompts = jnp.asarray(PROMPTS)
  bad = [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
         ({"top_k": -2}, "top_k"), ({"num_samples": 0}, "num_samples"),
         ({"min_decode_length": MAX_LEN + 1}, "min_decode_length")]
  for kwargs, field in bad:
    with pytest.raises(ValueError, match=field):
      sampling.sample(params, prompts, config=CONFIG, rng=RNG,
                      **{"max_decode_length": MAX_LEN, **kwargs})
  with pytest.raises(ValueError, match="encoder_input_tokens"):
    sampling.sample(params, prompts[0], config=CONFIG, rng=RNG)
  with pytest.raises(ValueError, match="reduction"):
    sampling.sequence_logprobs(params, prompts, prompts, config=CONFIG, reduction="max")
  with pytest.raises(ValueError, match="batch mismatch"):
    sampling.token_logprobs(params, prompts, prompts[:2], config=CONFIG)
  other = t5.T5Config(**{**CONFIG.__dict__, "vocab_size": 32})
  with pytest.raises(ValueError, match="vocab"):
    sampling.per_token_kl(params, params, prompts, prompts, config=CONFIG, ref_config=other)
