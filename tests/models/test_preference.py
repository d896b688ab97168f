"""Pairwise preference model: serialisation, scoring and the decision rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5align.models import preference as pm
from t5align.models import t5

FMT = pm.PairFormat(response_1_marker=(90, 92), response_2_marker=(91,), first_token=3,
                    second_token=4)
CFG = t5.T5Config(vocab_size=100, emb_dim=16, num_heads=2, head_dim=4, mlp_dim=32,
                  num_encoder_layers=1, num_decoder_layers=1, dtype="float32")


@pytest.mark.parametrize("jit", [False, True])
def test_serialize_pair_layout_and_left_truncation(jit):
  fn = jax.jit(pm.serialize_pair, static_argnums=(3, 4)) if jit else pm.serialize_pair
  prompt = jnp.array([[5, 6, 7, 8, 1], [9, 1, 0, 0, 0]])
  y1 = jnp.array([[20, 1, 0], [1, 0, 0]])
  y2 = jnp.array([[30, 31, 1], [40, 41, 42]])  # second row: truncated sample, no EOS
  out = np.asarray(fn(prompt, y1, y2, FMT, 11))
  # Row 0: 11 - 4 (markers + EOS) - 1 - 2 = 4 prompt tokens fit: the whole prompt.
  np.testing.assert_array_equal(out[0], [5, 6, 7, 8, 90, 92, 20, 91, 30, 31, 1])
  np.testing.assert_array_equal(out[1], [9, 90, 92, 91, 40, 41, 42, 1, 0, 0, 0])
  # Budget 10 leaves 3 prompt tokens: the earliest one is dropped.
  short = np.asarray(fn(prompt, y1, y2, FMT, 10))
  np.testing.assert_array_equal(short[0], [6, 7, 8, 90, 92, 20, 91, 30, 31, 1])


def test_serialize_pair_rejects_lengths_that_cannot_fit():
  with pytest.raises(ValueError, match="do not fit"):
    pm.serialize_pair(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 5), jnp.int32),
                      jnp.zeros((1, 5), jnp.int32), FMT, 12)


def test_serialize_single():
  out = pm.serialize_single(jnp.array([[5, 6, 1]]), jnp.array([[20, 21, 1]]), FMT, 8)
  np.testing.assert_array_equal(np.asarray(out), [[5, 6, 90, 92, 20, 21, 1, 0]])


def test_suffix_goes_after_the_second_response():
  fmt = pm.PairFormat((90,), (91,), 3, 4, suffix=(95, 96))
  out = pm.serialize_pair(jnp.array([[5, 6, 1]]), jnp.array([[20, 1]]), jnp.array([[30, 1]]),
                          fmt, 9)
  # 9 - (1 + 1 + 2 + 1) - 1 - 1 = 2 prompt tokens fit.
  np.testing.assert_array_equal(np.asarray(out), [[5, 6, 90, 20, 91, 30, 95, 96, 1]])


def test_pair_score_is_first_step_logit_difference():
  params = t5.init_params(CFG, jax.random.key(0))
  inputs = pm.serialize_pair(jnp.array([[5, 6, 1]]), jnp.array([[20, 1]]), jnp.array([[30, 1]]),
                             FMT, 10)
  logits = t5.Transformer(CFG).apply({"params": params}, inputs, jnp.zeros((1, 1), jnp.int32),
                                     jnp.ones((1, 1), jnp.int32))[:, 0]
  want = logits[:, 3] - logits[:, 4]
  np.testing.assert_allclose(pm.pair_score(params, CFG, FMT, inputs), want, rtol=1e-6)
  np.testing.assert_allclose(pm.reward(params, CFG, FMT, inputs), logits[:, 3], rtol=1e-6)


def test_symmetric_preference_swaps_roles():
  params = t5.init_params(CFG, jax.random.key(1))
  prompt = jnp.array([[5, 6, 1], [7, 1, 0]])
  y1 = jnp.array([[20, 21, 1], [22, 1, 0]])
  y2 = jnp.array([[30, 1, 0], [31, 32, 1]])
  a = pm.symmetric_preference(params, CFG, FMT, prompt, y1, y2, 16)
  b = pm.symmetric_preference(params, CFG, FMT, prompt, y2, y1, 16)
  np.testing.assert_allclose(a["r12"], b["r21"], rtol=1e-6)
  np.testing.assert_allclose(a["margin"], -b["margin"], rtol=1e-6, atol=1e-7)
  direct = jax.nn.sigmoid(pm.pair_score(params, CFG, FMT, pm.serialize_pair(prompt, y1, y2, FMT, 16)))
  np.testing.assert_allclose(a["r12"], direct, rtol=1e-6)


def test_decision_rule_and_agreement():
  margin = jnp.array([0.3, -0.01, 0.0])
  label = pm.decide(margin)
  np.testing.assert_array_equal(np.asarray(label), [1.0, 0.0, 0.5])
  # Position bias: r12 = 0.9 and r21 = 0.8 both favour "the first"; the rule says y1 wins.
  assert float(pm.decide(jnp.array([0.9 - 0.8]))[0]) == 1.0
  np.testing.assert_allclose(pm.agreement(label, jnp.array([1.0, 1.0, 1.0])), [1.0, 0.0, 0.5])
  np.testing.assert_allclose(pm.agreement(jnp.array([1.0]), jnp.array([0.7])), [0.7])
