"""Parity of our T5 with the Hugging Face PyTorch T5 through the checkpoint readers.

A random tiny ``transformers.T5ForConditionalGeneration`` that exercises every
option (d_model != heads * d_kv, different encoder/decoder depths, non-default
relative buckets / max distance / layer-norm epsilon, gated GeLU, a separate
``lm_head``, non-unit layer-norm scales) is saved with ``save_pretrained``
(single file and sharded), read back with ``load_pretrained``, and run by both
implementations in float32 on a batch with padding in inputs and targets.
The T5X tiny checkpoint goes the other way, through ``to_hf_state_dict``.

transformers 5.23.0 notes (checked here): ``T5Config(tie_word_embeddings=False)``
gives ``scale_decoder_outputs=False`` (no d_model**-0.5 decoder-output scale,
i.e. the v1.1 detection fix of huggingface/transformers#43681 is in), but the
config then forces ``tie_word_embeddings=True``, so a freshly built model has
``lm_head`` tied to ``shared``; we untie it explicitly and check it stays untied.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5align.models import hf_checkpoint, load, t5
from t5align.models.t5x_checkpoint import flatten_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

TINY_T5 = (pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "t5x"
           / "test_t5_tiny.checkpoint_0")
HF_SETTINGS = dict(
    vocab_size=128, d_model=20, d_kv=8, num_heads=3, d_ff=36, num_layers=2,
    num_decoder_layers=3, relative_attention_num_buckets=12,
    relative_attention_max_distance=20, layer_norm_epsilon=1e-5, dropout_rate=0.0,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
    pad_token_id=0, eos_token_id=1)
MAX_NEW_TOKENS = 12


def _batch(vocab_size, seed=0):
  """Encoder inputs [3, 30] and targets [3, 26] with EOS then padding."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, (3, 30))
  targets = rng.integers(2, vocab_size, (3, 26))
  for row, (n_in, n_out) in enumerate([(30, 26), (17, 9), (5, 21)]):
    inputs[row, n_in - 1], inputs[row, n_in:] = 1, 0
    targets[row, n_out - 1], targets[row, n_out:] = 1, 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def _hf_logits(model, inputs, decoder_inputs, targets):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                decoder_input_ids=torch.tensor(decoder_inputs),
                decoder_attention_mask=torch.tensor(targets > 0))
  return out.logits.numpy()


def _our_logits(config, params, inputs, decoder_inputs, targets):
  apply = jax.jit(t5.Transformer(config).apply)
  return np.asarray(apply({"params": params}, jnp.asarray(inputs, jnp.int32),
                          jnp.asarray(decoder_inputs, jnp.int32), jnp.asarray(targets, jnp.int32)))


def _assert_logits_close(ours, theirs, targets):
  valid = targets > 0
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  err = np.max(np.abs(ours[valid] - theirs[valid])) / np.max(np.abs(theirs[valid]))
  assert err < 1e-4, f"relative logits error {err:.2e}"


def _our_greedy(config, params, inputs, steps):
  """Greedy decoding with our cached decoder; positions after EOS are 0."""
  model = t5.Transformer(config)
  variables = {"params": params}
  tokens_in = jnp.asarray(inputs, jnp.int32)
  encoded = model.apply(variables, tokens_in, method="encode")
  cache = model.apply(variables, encoded, tokens_in, steps, method="init_decode_cache")
  decode_step = jax.jit(functools.partial(model.apply, method="decode_step"))
  token = jnp.zeros((inputs.shape[0],), jnp.int32)
  done = np.zeros(inputs.shape[0], bool)
  out = []
  for _ in range(steps):
    logits, cache = decode_step(variables, token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    emitted = np.where(done, 0, np.asarray(token))
    out.append(emitted)
    done |= emitted == t5.EOS_ID
  return np.stack(out, axis=1)


def _hf_greedy(model, inputs, steps):
  # use_cache=False: transformers 5.23.0 sizes the decoder KV cache by the
  # encoder depth (num_layers) and fails when num_decoder_layers is larger.
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                         max_new_tokens=steps, min_new_tokens=0, do_sample=False, num_beams=1,
                         use_cache=False)
  out = out[:, 1:].numpy()  # drop the decoder start token
  return np.pad(out, ((0, 0), (0, steps - out.shape[1])))


def _random_hf_model(seed=0, **changes):
  torch.manual_seed(seed)
  hf_config = transformers.T5Config(**dict(HF_SETTINGS, **changes))
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:  # ones by default, which would hide a scale mix-up
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
  return model


def _untie_lm_head(model):
  vocab, dim = model.lm_head.weight.shape
  model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, dim) * dim ** -0.5)
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()


@pytest.fixture(scope="module")
def hf_model():
  model = _random_hf_model()
  assert model.config.scale_decoder_outputs is False  # the #43681 fix
  _untie_lm_head(model)
  with torch.no_grad():
    # Make EOS win wherever token 113 would (under this seed), so that
    # greedy rows end at different steps and the post-EOS padding is compared.
    model.lm_head.weight[t5.EOS_ID] = 1.02 * model.lm_head.weight[113]
  return model


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf_single")
  hf_model.save_pretrained(directory)
  return directory


def test_config_matches_hf_settings(saved):
  config, _ = load.load_pretrained(saved, dtype="float32")
  assert config == t5.T5Config(
      vocab_size=128, emb_dim=20, num_heads=3, head_dim=8, mlp_dim=36, num_encoder_layers=2,
      num_decoder_layers=3, relative_attention_num_buckets=12,
      relative_attention_max_distance=20, dropout_rate=0.0, dtype="float32",
      layer_norm_epsilon=1e-5)


def test_logits_match_hf(hf_model, saved):
  config, params = load.load_pretrained(saved, dtype="float32")
  batch = _batch(config.vocab_size)
  _assert_logits_close(_our_logits(config, params, *batch), _hf_logits(hf_model, *batch),
                       batch[2])


def test_sharded_save_loads_identically(hf_model, saved, tmp_path):
  hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert not (tmp_path / "model.safetensors").exists()
  _, sharded = load.load_pretrained(tmp_path, dtype="float32")
  _, single = load.load_pretrained(saved, dtype="float32")
  assert jax.tree.all(jax.tree.map(np.array_equal, sharded, single))


def test_greedy_generations_match_hf(hf_model, saved):
  config, params = load.load_pretrained(saved, dtype="float32")
  inputs = _batch(config.vocab_size, seed=1)[0]
  ours = _our_greedy(config, params, inputs, MAX_NEW_TOKENS)
  np.testing.assert_array_equal(ours, _hf_greedy(hf_model, inputs, MAX_NEW_TOKENS))


def test_hub_style_v1_1_config(hf_model, saved, tmp_path):
  """A config.json as released for google/t5-v1_1-* (tie false, no scale flag)."""
  for name in ("model.safetensors", "generation_config.json"):
    (tmp_path / name).write_bytes((saved / name).read_bytes())
  config_json = json.loads((saved / "config.json").read_text())
  config_json["tie_word_embeddings"] = False
  config_json.pop("scale_decoder_outputs", None)
  (tmp_path / "config.json").write_text(json.dumps(config_json))
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert reloaded.config.scale_decoder_outputs is False
  assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)
  config, params = load.load_pretrained(tmp_path, dtype="float32")
  batch = _batch(config.vocab_size)
  theirs = _hf_logits(reloaded, *batch)
  _assert_logits_close(_our_logits(config, params, *batch), theirs, batch[2])
  _assert_logits_close(theirs, _hf_logits(hf_model, *batch), batch[2])


def test_tied_and_scaled_head_is_folded(tmp_path):
  """tie_word_embeddings=True (T5 1.0 head on a gated-GeLU body): lm_head = shared * E**-0.5."""
  model = _random_hf_model(seed=2, tie_word_embeddings=True)
  assert model.config.scale_decoder_outputs is True
  model.save_pretrained(tmp_path)
  config, params = load.load_pretrained(tmp_path, dtype="float32")
  batch = _batch(config.vocab_size, seed=2)
  _assert_logits_close(_our_logits(config, params, *batch), _hf_logits(model, *batch), batch[2])


@pytest.mark.skipif(not TINY_T5.exists(), reason=f"shared fixture {TINY_T5} absent")
def test_t5x_tiny_checkpoint_matches_hf():
  config, params = load.load_pretrained(TINY_T5, dtype="float32")
  hf_config = transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
      num_heads=config.num_heads, d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      layer_norm_epsilon=config.layer_norm_epsilon, dropout_rate=0.0,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  _untie_lm_head(model)
  state = {k: torch.tensor(v) for k, v in hf_checkpoint.to_hf_state_dict(params, config).items()}
  model.load_state_dict(state, strict=True)
  np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                params["decoder"]["logits_dense"]["kernel"].T)
  batch = _batch(config.vocab_size, seed=3)
  ours = _our_logits(config, params, *batch)
  _assert_logits_close(ours, _hf_logits(model, *batch), batch[2])
  # The inverse mapping round-trips exactly.
  back = hf_checkpoint.from_hf_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()}, config)
  for name, value in flatten_params(params).items():
    np.testing.assert_array_equal(flatten_params(back)[name], value, err_msg=name)


def test_saved_checkpoint_loads_in_transformers(tmp_path):
  """``save_hf_checkpoint`` writes a directory that transformers reads as the same network."""
  config = t5.T5Config(vocab_size=128, emb_dim=20, num_heads=3, head_dim=8, mlp_dim=36,
                       num_encoder_layers=2, num_decoder_layers=3,
                       relative_attention_num_buckets=12, relative_attention_max_distance=20,
                       dropout_rate=0.0, dtype="float32")
  params = jax.tree.map(np.asarray, t5.init_params(config, jax.random.key(5)))
  hf_checkpoint.save_hf_checkpoint(str(tmp_path), params, config)
  model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert model.config.scale_decoder_outputs is False
  np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                params["decoder"]["logits_dense"]["kernel"].T)
  batch = _batch(config.vocab_size, seed=4)
  _assert_logits_close(_our_logits(config, params, *batch), _hf_logits(model, *batch), batch[2])
