"""T5 v1.1 encoder-decoder in Flax with T5X's exact parameter tree.

Parameter names, shapes and layouts are a public interface: they are the names
of T5X checkpoints (``encoder/layers_0/attention/query/kernel`` ...), kernels
are stored 2-D ``[prod(input dims), prod(output dims)]`` in float32, and every
parameter carries T5X's logical axis names so that ``t5align.partitioning`` can
shard it. Numerics follow T5X: RMSNorm in float32, unscaled dot-product
attention (1/sqrt(head_dim) lives in the query initialiser), gated GeLU
(tanh approximation), one relative-position table per stack, logits in float32.

Two ways to run the decoder:

* teacher forcing (``__call__`` / ``decode``): all target positions at once;
* incremental decoding (``init_decode_cache`` then ``decode_step``): one token
  at a time with an explicit cache pytree holding each layer's self-attention
  keys/values ``[batch, max_len, heads, head_dim]`` and the cross-attention
  keys/values ``[batch, src_len, heads, head_dim]``, computed once per batch.

Masks, worked example (pad = 0, EOS = 1). With encoder tokens ``[5, 6, 1, 0]``
the encoder attends over the first three positions only. With decoder targets
``[7, 1, 0]`` and inputs ``[0, 7, 1]`` (shifted right), target position 1 may
attend to input positions 0 and 1 (causal), never to position 2 (padding).
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = 0
_NEG_INF = -1e10


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Dimensions and numerics of one T5 v1.1 network."""
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"  # activations; parameters are always float32
  layer_norm_epsilon: float = 1e-6

  def __post_init__(self):
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "num_encoder_layers", "num_decoder_layers",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
    if self.relative_attention_num_buckets % 2:
      raise ValueError("T5Config.relative_attention_num_buckets must be even (half per direction "
                       f"in the encoder), got {self.relative_attention_num_buckets}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)


# Dimensions of the released T5 v1.1 sizes (t5x/examples/t5/t5_1_1/*.gin); the
# gin files under gin/models/t5_1_1/ bind the same numbers.
T5_1_1_SIZES: Mapping[str, T5Config] = {
    "tiny": T5Config(emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                     num_encoder_layers=2, num_decoder_layers=2),
    "small": T5Config(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                      num_encoder_layers=8, num_decoder_layers=8),
    "base": T5Config(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
                     num_encoder_layers=12, num_decoder_layers=12),
    "large": T5Config(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816,
                      num_encoder_layers=24, num_decoder_layers=24),
    "xl": T5Config(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
                   num_encoder_layers=24, num_decoder_layers=24),
    "xxl": T5Config(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240,
                    num_encoder_layers=24, num_decoder_layers=24),
}


def _partitioned(init: Callable, axes: tuple) -> Callable:
  return nn.with_logical_partitioning(init, axes)


def _query_init(head_dim: int) -> Callable:
  """T5X folds the 1/sqrt(head_dim) attention scale into the query initialiser."""
  base = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) / np.sqrt(head_dim).astype(dtype)
  return init


_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_MLP_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_RELPOS_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


class Dense(nn.Module):
  """A bias-free projection whose kernel is stored 2-D ``[in, out]`` in float32."""
  features: int
  kernel_axes: tuple
  dtype: Any
  kernel_init: Callable = _KERNEL_INIT

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _partitioned(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
  """T5's "LayerNorm": no mean subtraction, no bias, statistics in float32."""
  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _partitioned(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    scale = scale.reshape((1,) * (x.ndim - 1) + (-1,)).astype(self.dtype)
    return x32.astype(self.dtype) * scale


class Embed(nn.Module):
  """The token table shared by encoder and decoder inputs (not scaled by sqrt(E))."""
  num_embeddings: int
  features: int
  dtype: Any

  def setup(self):
    self.embedding = self.param(
        "embedding", _partitioned(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """Maps ``key_pos - query_pos`` to a T5 relative-position bucket id.

  Bidirectional (encoder): half the buckets per direction, ``+num_buckets/2``
  when the key lies after the query. Causal (decoder): future keys share
  bucket 0 (they are masked anyway), all buckets describe the past. Within a
  direction, distances below ``max_exact = nb/2`` get their own bucket, larger
  ones share logarithmically wider buckets up to ``max_distance``.

  Example (32 buckets, max distance 128, causal): distances 0..15 -> buckets
  0..15; 16..18 -> 16; 127 -> 31; 1000 -> 31.
  """
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  eps = np.finfo(np.float32).eps
  log_ratio = (jnp.log(n.astype(jnp.float32) / max_exact + eps)
               / np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
  """One learned table per stack: ``rel_embedding [heads, num_buckets]``."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any

  def setup(self):
    self.rel_embedding = self.param(
        "rel_embedding", _partitioned(_RELPOS_INIT, ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)

  def __call__(self, query_positions: Array, key_positions: Array, *, bidirectional: bool) -> Array:
    """Bias ``[1, heads, q_len, k_len]`` for the given absolute positions."""
    relative = key_positions[None, :] - query_positions[:, None]  # [q_len, k_len]
    buckets = relative_position_bucket(relative, bidirectional=bidirectional,
                                       num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    bias = jnp.take(self.rel_embedding, buckets, axis=1)  # [heads, q_len, k_len]
    return bias[None].astype(self.dtype)


def mask_to_bias(mask: Array, dtype) -> Array:
  """Boolean attention mask -> additive bias (0 where allowed, -1e10 elsewhere)."""
  return jnp.where(mask, 0.0, _NEG_INF).astype(dtype)


class MultiHeadAttention(nn.Module):
  """Unscaled dot-product attention with 2-D ``[E, H*D]`` / ``[H*D, E]`` kernels."""
  num_heads: int
  head_dim: int
  emb_dim: int
  dropout_rate: float
  dtype: Any

  def setup(self):
    inner = self.num_heads * self.head_dim
    self.query = Dense(inner, ("embed", "joined_kv"), self.dtype, _query_init(self.head_dim))
    self.key = Dense(inner, ("embed", "joined_kv"), self.dtype)
    self.value = Dense(inner, ("embed", "joined_kv"), self.dtype)
    self.out = Dense(self.emb_dim, ("joined_kv", "embed"), self.dtype)

  def _split_heads(self, x: Array) -> Array:
    # [batch, length, heads * head_dim] -> [batch, length, heads, head_dim]
    x = x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
    return nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))

  def project_query(self, x: Array) -> Array:
    return self._split_heads(self.query(x))

  def project_key_value(self, x: Array) -> tuple[Array, Array]:
    return self._split_heads(self.key(x)), self._split_heads(self.value(x))

  def attend(self, q: Array, k: Array, v: Array, bias: Array, *, deterministic: bool) -> Array:
    """Attention output ``[B, Q, E]`` from q ``[B,Q,H,D]``, k/v ``[B,K,H,D]``.

    ``bias`` broadcasts to ``[B, H, Q, K]`` and already holds both the mask
    (-1e10) and the relative-position bias. Softmax runs in float32.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + bias.astype(jnp.float32), axis=-1)
    if not deterministic and self.dropout_rate > 0.0:
      # As T5X: one dropout mask broadcast over the query axis.
      shape = weights.shape[:2] + (1,) + weights.shape[3:]
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, shape)
      weights = jnp.where(keep, weights / (1.0 - self.dropout_rate), 0.0)
    weights = weights.astype(self.dtype)
    x = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(self.dtype))  # [B, Q, H, D]
    x = x.reshape(x.shape[:2] + (self.num_heads * self.head_dim,))  # [B, Q, H*D]
    return self.out(x)

  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array, *,
               deterministic: bool) -> Array:
    q = self.project_query(inputs_q)
    k, v = self.project_key_value(inputs_kv)
    return self.attend(q, k, v, bias, deterministic=deterministic)


class GatedMlp(nn.Module):
  """gelu(x @ wi_0) * (x @ wi_1) -> dropout -> wo, with tanh-approximate GeLU."""
  emb_dim: int
  mlp_dim: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    gate = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, _MLP_INIT, name="wi_0")(x)
    linear = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, _MLP_INIT, name="wi_1")(x)
    h = jax.nn.gelu(gate, approximate=True) * linear  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
    return Dense(self.emb_dim, ("mlp", "embed"), self.dtype, _MLP_INIT, name="wo")(h)


def _dropout(config: T5Config) -> nn.Dropout:
  # T5X broadcasts residual dropout over the length axis.
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))


class EncoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    c, dt = self.config, self.config.activation_dtype
    self.pre_attention_layer_norm = RMSNorm(c.layer_norm_epsilon, dt)
    self.attention = MultiHeadAttention(c.num_heads, c.head_dim, c.emb_dim, c.dropout_rate, dt)
    self.pre_mlp_layer_norm = RMSNorm(c.layer_norm_epsilon, dt)
    self.mlp = GatedMlp(c.emb_dim, c.mlp_dim, c.dropout_rate, dt)
    self.dropout = _dropout(c)

  def __call__(self, x: Array, bias: Array, *, deterministic: bool) -> Array:
    h = self.pre_attention_layer_norm(x)
    h = self.attention(h, h, bias, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic=deterministic)
    return x + self.dropout(h, deterministic=deterministic)


class DecoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    c, dt = self.config, self.config.activation_dtype
    self.pre_self_attention_layer_norm = RMSNorm(c.layer_norm_epsilon, dt)
    self.self_attention = MultiHeadAttention(c.num_heads, c.head_dim, c.emb_dim,
                                             c.dropout_rate, dt)
    self.pre_cross_attention_layer_norm = RMSNorm(c.layer_norm_epsilon, dt)
    self.encoder_decoder_attention = MultiHeadAttention(c.num_heads, c.head_dim, c.emb_dim,
                                                        c.dropout_rate, dt)
    self.pre_mlp_layer_norm = RMSNorm(c.layer_norm_epsilon, dt)
    self.mlp = GatedMlp(c.emb_dim, c.mlp_dim, c.dropout_rate, dt)
    self.dropout = _dropout(c)

  def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array, *,
               deterministic: bool) -> Array:
    h = self.pre_self_attention_layer_norm(x)
    h = self.self_attention(h, h, self_bias, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.pre_cross_attention_layer_norm(x)
    h = self.encoder_decoder_attention(h, encoded, cross_bias, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic=deterministic)
    return x + self.dropout(h, deterministic=deterministic)

  def cross_key_value(self, encoded: Array) -> tuple[Array, Array]:
    return self.encoder_decoder_attention.project_key_value(encoded)

  def step(self, x: Array, layer_cache: Mapping[str, Array], index: Array,
           self_bias: Array, cross_bias: Array) -> tuple[Array, dict]:
    """One decoding position: x ``[B, 1, E]``; writes this position's K/V at ``index``."""
    h = self.pre_self_attention_layer_norm(x)
    q = self.self_attention.project_query(h)
    k, v = self.self_attention.project_key_value(h)  # [B, 1, H, D]
    keys = jax.lax.dynamic_update_slice_in_dim(layer_cache["self_key"], k.astype(
        layer_cache["self_key"].dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(layer_cache["self_value"], v.astype(
        layer_cache["self_value"].dtype), index, axis=1)
    h = self.self_attention.attend(q, keys, values, self_bias, deterministic=True)
    x = x + h
    h = self.pre_cross_attention_layer_norm(x)
    q = self.encoder_decoder_attention.project_query(h)
    h = self.encoder_decoder_attention.attend(q, layer_cache["cross_key"],
                                              layer_cache["cross_value"], cross_bias,
                                              deterministic=True)
    x = x + h
    x = x + self.mlp(self.pre_mlp_layer_norm(x), deterministic=True)
    new_cache = dict(layer_cache, self_key=keys, self_value=values)
    return x, new_cache


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  def setup(self):
    c = self.config
    self.relpos_bias = RelativePositionBiases(c.relative_attention_num_buckets,
                                              c.relative_attention_max_distance, c.num_heads,
                                              c.activation_dtype)
    self.layers = [EncoderLayer(c) for _ in range(c.num_encoder_layers)]
    self.encoder_norm = RMSNorm(c.layer_norm_epsilon, c.activation_dtype)
    self.dropout = _dropout(c)

  def __call__(self, encoder_input_tokens: Array, *, deterministic: bool) -> Array:
    length = encoder_input_tokens.shape[1]
    valid = encoder_input_tokens > 0  # [B, S]
    positions = jnp.arange(length)
    bias = (self.relpos_bias(positions, positions, bidirectional=True)
            + mask_to_bias(valid[:, None, None, :] & valid[:, None, :, None],
                           self.config.activation_dtype))  # [B, H, S, S]
    x = self.shared_embedding(encoder_input_tokens)  # [B, S, E]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.dropout(x, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, bias, deterministic=deterministic)
    x = self.encoder_norm(x)
    return self.dropout(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  def setup(self):
    c = self.config
    self.relpos_bias = RelativePositionBiases(c.relative_attention_num_buckets,
                                              c.relative_attention_max_distance, c.num_heads,
                                              c.activation_dtype)
    self.layers = [DecoderLayer(c) for _ in range(c.num_decoder_layers)]
    self.decoder_norm = RMSNorm(c.layer_norm_epsilon, c.activation_dtype)
    self.dropout = _dropout(c)
    # Logits are computed in float32 (T5X: DenseGeneral with dtype float32).
    self.logits_dense = Dense(c.vocab_size, ("embed", "vocab"), jnp.float32, _MLP_INIT)

  def _logits(self, x: Array, *, deterministic: bool) -> Array:
    x = self.decoder_norm(x)
    x = self.dropout(x, deterministic=deterministic)
    logits = self.logits_dense(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, *, deterministic: bool) -> Array:
    dt = self.config.activation_dtype
    length = decoder_input_tokens.shape[1]
    target_valid = decoder_target_tokens > 0  # [B, T]
    positions = jnp.arange(length)
    causal = positions[None, :] <= positions[:, None]  # [T(query), T(key)]
    self_mask = causal[None, None] & target_valid[:, None, :, None] & target_valid[:, None, None, :]
    self_bias = (self.relpos_bias(positions, positions, bidirectional=False)
                 + mask_to_bias(self_mask, dt))  # [B, H, T, T]
    cross_mask = target_valid[:, None, :, None] & (encoder_input_tokens > 0)[:, None, None, :]
    cross_bias = mask_to_bias(cross_mask, dt)  # [B, 1, T, S]
    x = self.shared_embedding(decoder_input_tokens)  # [B, T, E]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.dropout(x, deterministic=deterministic)
    for layer in self.layers:
      x = layer(x, encoded, self_bias, cross_bias, deterministic=deterministic)
    return self._logits(x, deterministic=deterministic)

  def init_cache(self, encoded: Array, encoder_input_tokens: Array, max_decode_length: int) -> dict:
    batch = encoded.shape[0]
    dt = self.config.activation_dtype
    c = self.config
    empty = jnp.zeros((batch, max_decode_length, c.num_heads, c.head_dim), dt)
    layers = []
    for layer in self.layers:
      k, v = layer.cross_key_value(encoded)  # [B, S, H, D], computed once per batch
      layers.append({"self_key": empty, "self_value": empty, "cross_key": k, "cross_value": v})
    cross_bias = mask_to_bias((encoder_input_tokens > 0)[:, None, None, :], dt)  # [B, 1, 1, S]
    return {"index": jnp.zeros((), jnp.int32), "cross_bias": cross_bias, "layers": layers}

  def step(self, token: Array, cache: Mapping[str, Any]) -> tuple[Array, dict]:
    """Logits ``[B, V]`` for the token at position ``cache['index']``."""
    index = cache["index"]
    max_len = cache["layers"][0]["self_key"].shape[1]
    key_positions = jnp.arange(max_len)
    self_bias = (self.relpos_bias(index[None], key_positions, bidirectional=False)
                 + mask_to_bias((key_positions <= index)[None, None, None, :],
                                self.config.activation_dtype))  # [1, H, 1, L]
    x = self.shared_embedding(token[:, None])  # [B, 1, E]
    new_layers = []
    for layer, layer_cache in zip(self.layers, cache["layers"]):
      x, layer_cache = layer.step(x, layer_cache, index, self_bias, cache["cross_bias"])
      new_layers.append(layer_cache)
    logits = self._logits(x, deterministic=True)[:, 0]  # [B, V]
    return logits, {"index": index + 1, "cross_bias": cache["cross_bias"], "layers": new_layers}


class Transformer(nn.Module):
  """The T5 v1.1 encoder-decoder; call convention of T5X's ``EncoderDecoderModel``."""
  config: T5Config

  def setup(self):
    c = self.config
    self.token_embedder = Embed(c.vocab_size, c.emb_dim, c.activation_dtype)
    self.encoder = Encoder(c, shared_embedding=self.token_embedder)
    self.decoder = Decoder(c, shared_embedding=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
    """Encoder output ``[batch, src_len, emb_dim]``."""
    return self.encoder(encoder_input_tokens, deterministic=not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, enable_dropout: bool = False) -> Array:
    """Teacher-forced float32 logits ``[batch, target_len, vocab]``."""
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        decoder_target_tokens, deterministic=not enable_dropout)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, enable_dropout: bool = False) -> Array:
    encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, enable_dropout=enable_dropout)

  def init_decode_cache(self, encoded: Array, encoder_input_tokens: Array,
                        max_decode_length: int) -> dict:
    """Empty self-attention caches plus every layer's cross-attention K/V.

    Returns ``{'index': int32 scalar, 'cross_bias': [B,1,1,S], 'layers': [per layer
    {'self_key','self_value': [B, max_len, H, D], 'cross_key','cross_value': [B, S, H, D]}]}``.
    """
    return self.decoder.init_cache(encoded, encoder_input_tokens, max_decode_length)

  def decode_step(self, token: Array, cache: Mapping[str, Any]) -> tuple[Array, dict]:
    """Feeds ``token [B]`` at position ``cache['index']``; returns (logits [B, V] f32, cache)."""
    return self.decoder.step(token, cache)


def shift_right(targets: Array) -> Array:
  """Decoder inputs from targets: ``[a, b, EOS, 0] -> [0, a, b, EOS]``."""
  shifted = jnp.zeros_like(targets).at[:, 1:].set(targets[:, :-1])
  return shifted.at[:, 0].set(DECODER_START_ID)


def _dummy_inputs(batch: int = 1, length: int = 1):
  tokens = jnp.ones((batch, length), jnp.int32)
  return tokens, tokens, tokens


def _init_boxed(config: T5Config, rng: Array):
  return Transformer(config).init(rng, *_dummy_inputs())["params"]


def init_params(config: T5Config, rng: Array) -> dict:
  """Random float32 parameters as a plain nested dict with T5X names."""
  return nn.unbox(_init_boxed(config, rng))


def abstract_params(config: T5Config) -> dict:
  """``jax.ShapeDtypeStruct`` tree of the parameters (no allocation)."""
  return nn.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def param_axes(config: T5Config) -> dict:
  """Tree of T5X logical axis names (a ``PartitionSpec`` per parameter)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def param_count(config: T5Config) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
