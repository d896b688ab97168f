"""Tests of the T5 v1.1 network against closed forms and plain-numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5align.models import t5

CFG = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=5, mlp_dim=24,
                  num_encoder_layers=2, num_decoder_layers=3, relative_attention_num_buckets=8,
                  relative_attention_max_distance=12, dtype="float32")
ENC = jnp.array([[5, 6, 7, 8, 1, 0], [9, 3, 1, 0, 0, 0]], jnp.int32)
TGT = jnp.array([[10, 11, 12, 13, 14, 15, 16, 1], [20, 21, 22, 1, 0, 0, 0, 0]], jnp.int32)


@pytest.fixture(scope="module")
def params():
  return t5.init_params(CFG, jax.random.key(0))


@pytest.mark.parametrize("size,expected", [("small", 77.0e6), ("base", 247.6e6), ("large", 783.2e6),
                                           ("xl", 2.85e9), ("xxl", 11.14e9)])
def test_param_counts_of_released_sizes(size, expected):
  # Abstract shapes only: nothing is allocated.
  count = t5.param_count(t5.T5_1_1_SIZES[size])
  assert abs(count - expected) / expected < 0.005, count


def _closed_form_count(c: t5.T5Config) -> int:
  e, hd, f, v = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim, c.vocab_size
  enc = c.num_encoder_layers * (4 * e * hd + 3 * e * f + 2 * e)
  dec = c.num_decoder_layers * (8 * e * hd + 3 * e * f + 3 * e)
  return 2 * v * e + enc + dec + 2 * c.num_heads * c.relative_attention_num_buckets + 2 * e


@pytest.mark.parametrize("size", ["tiny", "small", "xl"])
def test_param_count_matches_closed_form(size):
  c = t5.T5_1_1_SIZES[size]
  assert t5.param_count(c) == _closed_form_count(c)


def test_parameter_tree_has_t5x_names_and_2d_layouts(params):
  hd = CFG.num_heads * CFG.head_dim
  assert params["token_embedder"]["embedding"].shape == (64, 16)
  assert params["encoder"]["relpos_bias"]["rel_embedding"].shape == (2, 8)
  layer = params["encoder"]["layers_1"]
  assert set(layer) == {"pre_attention_layer_norm", "attention", "pre_mlp_layer_norm", "mlp"}
  assert layer["attention"]["query"]["kernel"].shape == (16, hd)
  assert layer["attention"]["out"]["kernel"].shape == (hd, 16)
  assert layer["mlp"]["wi_0"]["kernel"].shape == (16, 24)
  assert layer["mlp"]["wo"]["kernel"].shape == (24, 16)
  dec = params["decoder"]
  assert set(dec) == {"relpos_bias", "layers_0", "layers_1", "layers_2", "decoder_norm",
                      "logits_dense"}
  assert set(dec["layers_2"]) == {"pre_self_attention_layer_norm", "self_attention",
                                  "pre_cross_attention_layer_norm", "encoder_decoder_attention",
                                  "pre_mlp_layer_norm", "mlp"}
  assert dec["logits_dense"]["kernel"].shape == (16, 64)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  axes = t5.param_axes(CFG)
  assert tuple(axes["encoder"]["layers_0"]["attention"]["query"]["kernel"]) == ("embed", "joined_kv")
  assert tuple(axes["decoder"]["logits_dense"]["kernel"]) == ("embed", "vocab")
  assert tuple(axes["token_embedder"]["embedding"]) == ("vocab", "embed")
  assert tuple(axes["decoder"]["relpos_bias"]["rel_embedding"]) == ("heads", "relpos_buckets")
  assert tuple(axes["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]) == ("mlp", "embed")


def _bucket_reference(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
  """Scalar Python transcription of the rule in reference/t5x-compat.md §4."""
  n = -rel
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      bucket += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  eps = float(np.finfo(np.float32).eps)
  val = max_exact + int(math.log(n / max_exact + eps) / math.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return bucket + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_scalar_rule(bidirectional):
  rel = np.arange(-300, 301)
  got = np.asarray(t5.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                               num_buckets=32, max_distance=128))
  want = [_bucket_reference(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, want)


def test_relative_position_buckets_known_values():
  # Hand-derived for 32 causal buckets, max distance 128 (key before query => rel < 0).
  rel = jnp.array([0, -1, -15, -16, -18, -19, -127, -1000, 3])
  got = t5.relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
  # n=16: 16 + floor(log(1)/log(8)*16) = 16; n=19: 16 + floor(log(19/16)/log(8)*16) = 17.
  np.testing.assert_array_equal(np.asarray(got), [0, 1, 15, 16, 16, 17, 31, 31, 0])
  got = t5.relative_position_bucket(jnp.array([-1, 1, 20]), bidirectional=True, num_buckets=32,
                                    max_distance=128)
  # Bidirectional: 16 per direction, 8 exact; key after the query adds 16.
  # n=20: 8 + floor(log(20/8)/log(16)*8) = 8 + 2 = 10, then +16.
  np.testing.assert_array_equal(np.asarray(got), [1, 17, 26])


def _numpy_forward(p, enc, dec_in, tgt, c):
  """Independent float64 numpy T5 forward (no flax), with explicit 3-D reshapes."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  h, d = c.num_heads, c.head_dim

  def norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  def attn(a, xq, xkv, bias):
    e = xq.shape[-1]
    q = xq @ a["query"]["kernel"].reshape(e, h, d).reshape(e, h * d)
    q = q.reshape(*xq.shape[:2], h, d)
    k = (xkv @ a["key"]["kernel"]).reshape(*xkv.shape[:2], h, d)
    v = (xkv @ a["value"]["kernel"]).reshape(*xkv.shape[:2], h, d)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
    s = np.exp(s - s.max(-1, keepdims=True))
    w = s / s.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    out3 = a["out"]["kernel"].reshape(h, d, e)  # [heads, head_dim, embed]
    return np.einsum("bqhd,hde->bqe", o, out3)

  def mlp(m, x):
    return (gelu(x @ m["wi_0"]["kernel"]) * (x @ m["wi_1"]["kernel"])) @ m["wo"]["kernel"]

  def relbias(table, q, k, bidir):
    b = np.array([[_bucket_reference(j - i, bidir, c.relative_attention_num_buckets,
                                     c.relative_attention_max_distance) for j in range(k)]
                  for i in range(q)])
    return table[:, b][None]

  emb = p["token_embedder"]["embedding"]
  ev = np.asarray(enc) > 0
  x = emb[np.asarray(enc)]
  bias = relbias(p["encoder"]["relpos_bias"]["rel_embedding"], enc.shape[1], enc.shape[1], True)
  bias = bias + np.where(ev[:, None, None, :] & ev[:, None, :, None], 0, -1e10)
  for i in range(c.num_encoder_layers):
    lp = p["encoder"][f"layers_{i}"]
    y = norm(x, lp["pre_attention_layer_norm"]["scale"])
    x = x + attn(lp["attention"], y, y, bias)
    x = x + mlp(lp["mlp"], norm(x, lp["pre_mlp_layer_norm"]["scale"]))
  encoded = norm(x, p["encoder"]["encoder_norm"]["scale"])
  tv = np.asarray(tgt) > 0
  t = tgt.shape[1]
  causal = np.tril(np.ones((t, t), bool))
  sbias = relbias(p["decoder"]["relpos_bias"]["rel_embedding"], t, t, False)
  sbias = sbias + np.where(causal[None, None] & tv[:, None, :, None] & tv[:, None, None, :], 0, -1e10)
  cbias = np.where(tv[:, None, :, None] & ev[:, None, None, :], 0, -1e10)
  x = emb[np.asarray(dec_in)]
  for i in range(c.num_decoder_layers):
    lp = p["decoder"][f"layers_{i}"]
    y = norm(x, lp["pre_self_attention_layer_norm"]["scale"])
    x = x + attn(lp["self_attention"], y, y, sbias)
    y = norm(x, lp["pre_cross_attention_layer_norm"]["scale"])
    x = x + attn(lp["encoder_decoder_attention"], y, encoded, cbias)
    x = x + mlp(lp["mlp"], norm(x, lp["pre_mlp_layer_norm"]["scale"]))
  x = norm(x, p["decoder"]["decoder_norm"]["scale"])
  return x @ p["decoder"]["logits_dense"]["kernel"]


@pytest.mark.parametrize("jit", [False, True])
def test_forward_matches_numpy_reference(params, jit):
  model = t5.Transformer(CFG)
  fn = model.apply
  if jit:
    fn = jax.jit(model.apply)
  din = t5.shift_right(TGT)
  logits = fn({"params": params}, ENC, din, TGT)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 8, 64)
  want = _numpy_forward(params, ENC, din, TGT, CFG)
  valid = np.asarray(TGT) > 0
  np.testing.assert_allclose(np.asarray(logits)[valid], want[valid], rtol=1e-4, atol=1e-4)


def test_incremental_decoding_equals_teacher_forcing(params):
  model = t5.Transformer(CFG)
  din = t5.shift_right(TGT)
  want = model.apply({"params": params}, ENC, din, TGT)
  encoded = model.apply({"params": params}, ENC, method="encode")
  cache = model.apply({"params": params}, encoded, ENC, TGT.shape[1], method="init_decode_cache")
  step = jax.jit(lambda tok, cache: model.apply({"params": params}, tok, cache, method="decode_step"))
  got = []
  for t in range(TGT.shape[1]):
    logits, cache = step(din[:, t], cache)
    got.append(logits)
  got = np.stack(got, 1)
  valid = np.asarray(TGT) > 0
  np.testing.assert_allclose(got[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5)
  assert int(cache["index"]) == TGT.shape[1]


def test_shift_right():
  np.testing.assert_array_equal(np.asarray(t5.shift_right(jnp.array([[4, 5, 1, 0]]))), [[0, 4, 5, 1]])


def test_padding_does_not_change_valid_logits(params):
  model = t5.Transformer(CFG)
  din = t5.shift_right(TGT)
  base = model.apply({"params": params}, ENC, din, TGT)
  enc_pad = jnp.pad(ENC, ((0, 0), (0, 3)))
  tgt_pad = jnp.pad(TGT, ((0, 0), (0, 2)))
  padded = model.apply({"params": params}, enc_pad, t5.shift_right(tgt_pad), tgt_pad)
  valid = np.asarray(TGT) > 0
  np.testing.assert_allclose(np.asarray(padded)[:, :8][valid], np.asarray(base)[valid],
                             rtol=1e-5, atol=1e-5)


def test_dropout_only_when_enabled(params):
  cfg = t5.T5Config(**{**CFG.__dict__, "dropout_rate": 0.3})
  model = t5.Transformer(cfg)
  din = t5.shift_right(TGT)
  off = model.apply({"params": params}, ENC, din, TGT)
  np.testing.assert_allclose(off, t5.Transformer(CFG).apply({"params": params}, ENC, din, TGT),
                             rtol=1e-6)
  on1 = model.apply({"params": params}, ENC, din, TGT, enable_dropout=True,
                    rngs={"dropout": jax.random.key(1)})
  on2 = model.apply({"params": params}, ENC, din, TGT, enable_dropout=True,
                    rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(on1, off) and not np.allclose(on1, on2)


def test_bfloat16_activations_keep_float32_logits_and_params(params):
  cfg = t5.T5Config(**{**CFG.__dict__, "dtype": "bfloat16"})
  logits = t5.Transformer(cfg).apply({"params": params}, ENC, t5.shift_right(TGT), TGT)
  assert logits.dtype == jnp.float32
  ref = t5.Transformer(CFG).apply({"params": params}, ENC, t5.shift_right(TGT), TGT)
  valid = np.asarray(TGT) > 0
  # bf16 has ~3 significant digits; the network is shallow.
  assert np.max(np.abs(np.asarray(logits - ref)[valid])) < 0.1 * np.max(np.abs(np.asarray(ref)))


def test_query_initialiser_folds_attention_scale():
  cfg = t5.T5Config(vocab_size=32, emb_dim=256, num_heads=4, head_dim=64, mlp_dim=32,
                    num_encoder_layers=1, num_decoder_layers=1, dtype="float32")
  p = t5.init_params(cfg, jax.random.key(3))["encoder"]["layers_0"]["attention"]
  # fan_in normal: std 1/sqrt(E); query also divided by sqrt(head_dim).
  assert abs(float(jnp.std(p["key"]["kernel"])) - 1 / 16) < 0.005
  assert abs(float(jnp.std(p["query"]["kernel"])) - 1 / 16 / 8) < 0.0007


@pytest.mark.parametrize("kwargs", [{"emb_dim": 0}, {"relative_attention_num_buckets": 7},
                                    {"dropout_rate": 1.0}, {"dtype": "float77"}])
def test_config_validation(kwargs):
  with pytest.raises((ValueError, TypeError)):
    t5.T5Config(**kwargs)
