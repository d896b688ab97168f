"""Tests for the Hugging Face safetensors reader (no torch needed)."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from t5align.models import hf_checkpoint as hf
from t5align.models import load, t5
from t5align.models.t5x_checkpoint import CheckpointError, flatten_params

CONFIG = t5.T5Config(vocab_size=64, emb_dim=10, num_heads=3, head_dim=4, mlp_dim=12,
                     num_encoder_layers=2, num_decoder_layers=3,
                     relative_attention_num_buckets=16, relative_attention_max_distance=40,
                     dropout_rate=0.0, layer_norm_epsilon=1e-5, dtype="float32")


def _hf_config(**changes):
  """A config.json as the Hub's google/t5-v1_1-* and google/flan-t5-* files write it."""
  config = {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": CONFIG.vocab_size, "d_model": CONFIG.emb_dim, "d_kv": CONFIG.head_dim,
      "d_ff": CONFIG.mlp_dim, "num_heads": CONFIG.num_heads,
      "num_layers": CONFIG.num_encoder_layers, "num_decoder_layers": CONFIG.num_decoder_layers,
      "relative_attention_num_buckets": CONFIG.relative_attention_num_buckets,
      "relative_attention_max_distance": CONFIG.relative_attention_max_distance,
      "dropout_rate": 0.0, "layer_norm_epsilon": 1e-5, "feed_forward_proj": "gated-gelu",
      "tie_word_embeddings": False, "is_encoder_decoder": True, "pad_token_id": 0,
      "eos_token_id": 1, "decoder_start_token_id": 0, "initializer_factor": 1.0}
  config.update(changes)
  return {k: v for k, v in config.items() if v is not None}


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(np.asarray, t5.init_params(CONFIG, jax.random.key(11)))


def _write(directory, tensors, config=None, shards=None):
  """A HF model directory; ``shards`` maps shard file -> tensor names (sharded save)."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config or _hf_config()))
  if shards is None:
    save_file(dict(tensors), str(directory / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for shard, names in shards.items():
      save_file({n: tensors[n] for n in names}, str(directory / shard), metadata={"format": "pt"})
      weight_map.update({n: shard for n in names})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
  return directory


def _hf_tensors(params, *, tied_copies=False):
  tensors = hf.to_hf_state_dict(params, CONFIG)
  if not tied_copies:  # save_pretrained writes `shared.weight` only
    del tensors["encoder.embed_tokens.weight"], tensors["decoder.embed_tokens.weight"]
  return tensors


def _assert_same(a, b):
  fa, fb = flatten_params(a), flatten_params(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def test_name_table_rows_checked_by_hand():
  table = hf.hf_name_table(CONFIG)
  ours = [row[0] for row in table]
  assert sorted(ours) == sorted(flatten_params(t5.abstract_params(CONFIG)))
  assert len({row[1] for row in table}) == len(table)
  rows = {row[0]: row[1:] for row in table}
  assert rows["token_embedder/embedding"] == ("shared.weight", False)
  assert rows["encoder/relpos_bias/rel_embedding"] == (
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
  assert rows["encoder/layers_1/mlp/wo/kernel"] == (
      "encoder.block.1.layer.1.DenseReluDense.wo.weight", True)
  assert rows["encoder/layers_0/pre_mlp_layer_norm/scale"] == (
      "encoder.block.0.layer.1.layer_norm.weight", False)
  assert rows["decoder/layers_2/encoder_decoder_attention/out/kernel"] == (
      "decoder.block.2.layer.1.EncDecAttention.o.weight", True)
  assert rows["decoder/layers_1/self_attention/value/kernel"] == (
      "decoder.block.1.layer.0.SelfAttention.v.weight", True)
  assert rows["decoder/layers_0/pre_cross_attention_layer_norm/scale"] == (
      "decoder.block.0.layer.1.layer_norm.weight", False)
  assert rows["decoder/layers_2/pre_mlp_layer_norm/scale"] == (
      "decoder.block.2.layer.2.layer_norm.weight", False)
  assert rows["decoder/decoder_norm/scale"] == ("decoder.final_layer_norm.weight", False)
  assert rows["decoder/logits_dense/kernel"] == ("lm_head.weight", True)


def test_to_hf_state_dict_layouts(params):
  tensors = hf.to_hf_state_dict(params, CONFIG)
  # nn.Linear(in, out).weight is [out, in]; HF relpos is nn.Embedding(buckets, heads).
  assert tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape == (12, 10)
  assert tensors["encoder.block.0.layer.0.SelfAttention.o.weight"].shape == (10, 12)
  assert tensors["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"].shape == (12, 10)
  assert tensors["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape \
      == (16, 3)
  assert tensors["lm_head.weight"].shape == (64, 10)
  np.testing.assert_array_equal(tensors["encoder.block.1.layer.0.SelfAttention.k.weight"],
                                params["encoder"]["layers_1"]["attention"]["key"]["kernel"].T)
  assert tensors["encoder.embed_tokens.weight"] is tensors["shared.weight"]


def test_single_file_round_trip(tmp_path, params):
  directory = _write(tmp_path / "m", _hf_tensors(params, tied_copies=True))
  config, loaded = load.load_pretrained(directory, dtype="float32")
  assert config == CONFIG
  _assert_same(loaded, params)
  assert load.detect_format(directory / "config.json") == (load.HF, str(directory))


def test_save_hf_checkpoint_round_trip(tmp_path, params):
  directory = tmp_path / "saved"
  hf.save_hf_checkpoint(str(directory), params, CONFIG)
  assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]  # no temp files
  config, loaded = load.load_pretrained(directory, dtype="float32")
  assert config == CONFIG
  _assert_same(loaded, params)
  written = json.loads((directory / "config.json").read_text())
  assert (written["tie_word_embeddings"], written["scale_decoder_outputs"]) == (False, False)


def test_sharded_round_trip(tmp_path, params):
  tensors = _hf_tensors(params)
  names = sorted(tensors)
  directory = _write(tmp_path / "m", tensors, shards={
      "model-00001-of-00002.safetensors": names[:20],
      "model-00002-of-00002.safetensors": names[20:]})
  config, loaded = hf.load_hf_checkpoint(directory, dtype="float32")
  assert config == CONFIG
  _assert_same(loaded, params)


def test_bfloat16_tensors_are_upcast(tmp_path, params):
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _hf_tensors(params).items()}
  _, loaded = hf.load_hf_checkpoint(_write(tmp_path / "m", tensors), dtype="float32")
  emb = loaded["token_embedder"]["embedding"]
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(
      emb, params["token_embedder"]["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_dropout_and_dims_come_from_config_json(tmp_path, params):
  directory = _write(tmp_path / "m", _hf_tensors(params), _hf_config(dropout_rate=0.1))
  config, _ = load.load_pretrained(directory)
  assert (config.dropout_rate, config.dtype, config.layer_norm_epsilon) == (0.1, "bfloat16", 1e-5)
  assert config.relative_attention_max_distance == 40


@pytest.mark.parametrize("changes, message", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj: 'relu': only the T5 v1.1 gated-GeLU"),
    ({"feed_forward_proj": "gated-silu"}, "gated-silu"),
    ({"model_type": "umt5"}, "model_type: 'umt5' is not supported"),
    ({"model_type": None}, "model_type: missing"),
    ({"d_model": None}, "d_model: missing"),
    ({"pad_token_id": 3}, "pad_token_id: is 3; this model hard-codes 0"),
    ({"decoder_start_token_id": 2}, "decoder_start_token_id: is 2"),
    ({"relative_attention_num_buckets": 15}, "must be even"),
])
def test_bad_configs(tmp_path, params, changes, message):
  directory = _write(tmp_path / "m", _hf_tensors(params), _hf_config(**changes))
  with pytest.raises(CheckpointError, match=message) as info:
    load.load_pretrained(directory)
  assert str(directory / "config.json") in str(info.value)


def test_missing_tensor_is_named(tmp_path, params):
  tensors = _hf_tensors(params)
  del tensors["decoder.block.2.layer.1.EncDecAttention.k.weight"]
  directory = _write(tmp_path / "m", tensors)
  with pytest.raises(CheckpointError, match=r"decoder.block.2.layer.1.EncDecAttention.k.weight: "
                     "missing tensor"):
    hf.load_hf_checkpoint(directory)


def test_unexpected_tensor_is_named_with_its_file(tmp_path, params):
  tensors = _hf_tensors(params)
  tensors["decoder.block.3.layer.0.layer_norm.weight"] = np.ones(10, np.float32)
  directory = _write(tmp_path / "m", tensors)
  with pytest.raises(CheckpointError, match="decoder.block.3.layer.0.layer_norm.weight: "
                     "unexpected tensor") as info:
    hf.load_hf_checkpoint(directory)
  assert str(directory / "model.safetensors") in str(info.value)


def test_known_unused_tensor_is_ignored(tmp_path, params):
  tensors = _hf_tensors(params)
  tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros(
      (16, 3), np.float32)
  _, loaded = hf.load_hf_checkpoint(_write(tmp_path / "m", tensors), dtype="float32")
  _assert_same(loaded, params)


def test_shape_mismatch_is_named(tmp_path, params):
  tensors = _hf_tensors(params)
  tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((12, 10), np.float32)
  with pytest.raises(CheckpointError, match=r"encoder.block.1.layer.1.DenseReluDense.wo.weight: "
                     r"shape \[12, 10\] does not match \[10, 12\] expected for "
                     "encoder/layers_1/mlp/wo/kernel"):
    hf.load_hf_checkpoint(_write(tmp_path / "m", tensors))


def test_integer_tensor_is_rejected(tmp_path, params):
  tensors = _hf_tensors(params)
  tensors["encoder.final_layer_norm.weight"] = np.ones(10, np.int32)
  with pytest.raises(CheckpointError, match="encoder.final_layer_norm.weight: dtype int32"):
    hf.load_hf_checkpoint(_write(tmp_path / "m", tensors))


def test_untied_input_embeddings_are_rejected(tmp_path, params):
  tensors = _hf_tensors(params, tied_copies=True)
  tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
  with pytest.raises(CheckpointError, match="decoder.embed_tokens.weight: differs from "
                     "shared.weight"):
    hf.load_hf_checkpoint(_write(tmp_path / "m", tensors))


def test_missing_lm_head_with_untied_config(tmp_path, params):
  tensors = _hf_tensors(params)
  del tensors["lm_head.weight"]
  with pytest.raises(CheckpointError, match="lm_head.weight: missing and the config does not "
                     "tie it"):
    hf.load_hf_checkpoint(_write(tmp_path / "m", tensors))


@pytest.mark.parametrize("config_changes, scale", [
    # transformers 4.x: tied embeddings imply the d_model**-0.5 decoder-output scale.
    ({"tie_word_embeddings": None}, 10 ** -0.5),
    ({"tie_word_embeddings": True}, 10 ** -0.5),
    # transformers 5.x writes the scale as its own flag and always says tied.
    ({"tie_word_embeddings": True, "scale_decoder_outputs": False}, 1.0),
    ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, 10 ** -0.5),
])
def test_tied_head_conventions(tmp_path, params, config_changes, scale):
  tensors = _hf_tensors(params)
  del tensors["lm_head.weight"]
  directory = _write(tmp_path / "m", tensors, _hf_config(**config_changes))
  _, loaded = hf.load_hf_checkpoint(directory, dtype="float32")
  np.testing.assert_allclose(loaded["decoder"]["logits_dense"]["kernel"],
                             params["token_embedder"]["embedding"].T * scale, rtol=1e-7)


def test_untied_lm_head_wins_over_tied_flag(tmp_path, params):
  # transformers 5.x saves tie_word_embeddings=true even when lm_head is separate.
  directory = _write(tmp_path / "m", _hf_tensors(params),
                     _hf_config(tie_word_embeddings=True, scale_decoder_outputs=False))
  _, loaded = hf.load_hf_checkpoint(directory, dtype="float32")
  _assert_same(loaded, params)


@pytest.mark.parametrize("problem", ["escape", "wrong_shard", "unlisted", "absent_file",
                                     "not_in_shard"])
def test_bad_shard_index(tmp_path, params, problem):
  tensors = _hf_tensors(params)
  names = sorted(tensors)
  directory = _write(tmp_path / "m", tensors, shards={"a.safetensors": names[:10],
                                                       "b.safetensors": names[10:]})
  index_path = directory / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  victim = names[0]
  if problem == "escape":
    os.rename(directory / "a.safetensors", tmp_path / "a.safetensors")
    for name in names[:10]:
      index["weight_map"][name] = "../a.safetensors"
    message = "must be a plain file name"
  elif problem == "wrong_shard":
    index["weight_map"][victim] = "b.safetensors"
    message = f"{victim}: tensor not assigned to this shard"
  elif problem == "unlisted":
    del index["weight_map"][victim]
    message = f"{victim}: tensor not assigned to this shard"
  elif problem == "absent_file":
    os.remove(directory / "b.safetensors")
    message = "'b.safetensors' does not exist"
  else:
    index["weight_map"]["decoder.extra.weight"] = "a.safetensors"
    message = "decoder.extra.weight: listed in model.safetensors.index.json but not in the shard"
  index_path.write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=message):
    hf.load_hf_checkpoint(directory)


def test_hub_cache_symlinks_are_followed(tmp_path, params):
  # snapshot_download links each file of snapshots/<rev>/ to ../../blobs/<hash>.
  tensors = _hf_tensors(params)
  directory = _write(tmp_path / "snapshot", tensors, shards={"a.safetensors": sorted(tensors)})
  (tmp_path / "blobs").mkdir()
  os.rename(directory / "a.safetensors", tmp_path / "blobs" / "abc123")
  os.symlink(tmp_path / "blobs" / "abc123", directory / "a.safetensors")
  _, loaded = hf.load_hf_checkpoint(directory, dtype="float32")
  _assert_same(loaded, params)


def test_pickle_weights_are_not_read(tmp_path):
  directory = tmp_path / "m"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(_hf_config()))
  (directory / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointError, match="without safetensors weights.*pytorch_model.bin"):
    load.load_pretrained(directory)


# ---------------------------------------------------------------------------
# Import limits: config values by type and range, bounded reads, finite weights.

@pytest.mark.parametrize("changes, field, message", [
    ({"num_layers": 10**7}, "num_layers", r"expected an integer in \[1, 1024\], got 10000000"),
    ({"num_layers": 0}, "num_layers", r"expected an integer in \[1, 1024\], got 0"),
    ({"num_decoder_layers": 2.0}, "num_decoder_layers", "expected an integer.*got 2.0"),
    ({"vocab_size": True}, "vocab_size", "expected an integer.*got True"),
    ({"d_model": "10"}, "d_model", "expected an integer.*got '10'"),
    ({"dropout_rate": "abc"}, "dropout_rate", r"expected a number in \[0.0, 1.0\), got 'abc'"),
    ({"dropout_rate": [0.1]}, "dropout_rate", r"expected a number in \[0.0, 1.0\), got \[0.1\]"),
    ({"dropout_rate": 1.5}, "dropout_rate", r"expected a number in \[0.0, 1.0\), got 1.5"),
    ({"layer_norm_epsilon": "tiny"}, "layer_norm_epsilon",
     r"expected a number in \(0.0, 1.0\), got 'tiny'"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon", r"expected a number in \(0.0, 1.0\), got 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "expected true or false, got "
     "'false'"),
    ({"scale_decoder_outputs": 0}, "scale_decoder_outputs", "expected true or false, got 0"),
])
def test_config_values_are_checked_by_type_and_range(tmp_path, params, changes, field, message):
  directory = _write(tmp_path / "m", _hf_tensors(params), _hf_config(**changes))
  with pytest.raises(CheckpointError, match=f"config.json: {field}: {message}"):
    load.load_pretrained(directory)


def test_nan_weight_is_refused_with_its_file_unless_allowed(tmp_path, params):
  tensors = _hf_tensors(params)
  names = sorted(tensors)
  victim = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
  tensors[victim] = tensors[victim].copy()
  tensors[victim][2, 5] = np.nan
  directory = _write(tmp_path / "m", tensors, shards={"a.safetensors": names[:20],
                                                      "b.safetensors": names[20:]})
  shard = "a" if victim in names[:20] else "b"
  with pytest.raises(CheckpointError, match=fr"{shard}\.safetensors: {victim}: 1 non-finite "
                     r"value\(s\), the first nan at index \[2, 5\]"):
    load.load_pretrained(directory)
  _, loaded = load.load_pretrained(directory, allow_nonfinite=True)
  assert np.isnan(loaded["decoder"]["layers_1"]["mlp"]["wo"]["kernel"][5, 2])


def test_safetensors_over_max_bytes_are_not_opened(tmp_path, params):
  directory = _write(tmp_path / "m", _hf_tensors(params))
  size = os.path.getsize(directory / "model.safetensors")
  assert hf.load_hf_checkpoint(directory, max_bytes=size)[1].keys() == params.keys()
  with pytest.raises(CheckpointError, match=f"m: safetensors files of {size:,} bytes are over "
                     f"max_bytes={size - 1:,}"):
    load.load_pretrained(directory, max_bytes=size - 1)


@pytest.mark.parametrize("shape", [[2**17, 2**17], [2**32, 2**32]])
def test_safetensors_header_declaring_more_than_the_file_holds(tmp_path, shape):
  directory = tmp_path / "m"
  directory.mkdir()
  header = json.dumps({"shared.weight": {"dtype": "F32", "shape": shape,
                                         "data_offsets": [0, 4]}}).encode()
  (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                + b"\0" * 4)
  with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
    hf.read_hf_tensors(directory)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_a_checkpoint_error(tmp_path, params, name):
  directory = _write(tmp_path / "m", _hf_tensors(params), shards={
      "a.safetensors": sorted(_hf_tensors(params))})
  (directory / name).write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(CheckpointError, match=f"{name}: .*unreadable"):
    hf.load_hf_checkpoint(directory)
