"""Tests for the legacy T5X checkpoint reader, including hostile tensorstore specs."""

import dataclasses
import gzip
import json
import os
import pathlib

import jax
import ml_dtypes
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from t5align.models import load, t5
from t5align.models import t5x_checkpoint as ckpt

DATA = pathlib.Path(__file__).parent / "data"
LINEAR = DATA / "t5x_linear" / "checkpoint_1"
FIXTURES = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "t5x"
TINY_T5 = FIXTURES / "test_t5_tiny.checkpoint_0"

SMALL = t5.T5Config(vocab_size=64, emb_dim=10, num_heads=3, head_dim=4, mlp_dim=12,
                    num_encoder_layers=2, num_decoder_layers=3,
                    relative_attention_num_buckets=16, dtype="float32")


# ---------------------------------------------------------------------------
# Our own writer of the on-disk format (independent of the reader under test).

def _ext(code, array):
  payload = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes("C")),
                          use_bin_type=True)
  return msgpack.ExtType(code, payload)


def _pack(tree):
  def default(x):
    if isinstance(x, np.ndarray):
      return _ext(1, x)
    if isinstance(x, np.generic):
      return _ext(3, np.asarray(x))
    raise TypeError(type(x))
  return msgpack.packb(tree, default=default, use_bin_type=True, strict_types=True)


def _write_checkpoint(directory, tree):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "checkpoint").write_bytes(_pack(tree))
  return directory


def _write_zarr(array_dir, array, *, keep_zarray=True, dtype_name=None):
  """A gzip'd zarr v2 array written by tensorstore; returns the T5X-style metadata."""
  metadata = {"shape": list(array.shape), "chunks": list(array.shape) or [],
              "compressor": {"id": "gzip", "level": 1}}
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(array_dir) + "/"},
                   "metadata": dict(metadata, dtype=array.dtype.str if dtype_name is None
                                    else dtype_name)},
                  create=True, delete_existing=True).result()
  store.write(array).result()
  if not keep_zarray:
    os.remove(array_dir / ".zarray")
  return metadata


def _spec(relative, array, metadata, driver="gfile"):
  return {"driver": "zarr", "dtype": array.dtype.name,
          "kvstore": {"driver": driver, "path": relative}, "metadata": metadata}


def _target_checkpoint(directory, target, version=3):
  return _write_checkpoint(directory, {"version": version, "optimizer": {
      "target": target, "state": {"step": np.int32(7), "param_states": {}}}})


# ---------------------------------------------------------------------------
# The real T5X test data.

def test_linear_fixture_values_match_an_independent_decode():
  tree = ckpt.read_t5x_tree(LINEAR, subtree=())
  assert tree["version"] == 3 and tree["optimizer"]["target"] == {}
  states = tree["optimizer"]["state"]["param_states"]
  kernel, bias, step = states["kernel"], states["bias"], states["step"]
  assert (kernel.dtype, kernel.shape) == (np.float64, (10, 5))
  assert (bias.dtype, bias.shape) == (np.float32, (5,))
  assert (step.dtype, step.shape, int(step)) == (np.int32, (), 1)
  np.testing.assert_array_equal(bias, np.ones(5, np.float32))
  # Independent decode of the zarr chunk: gzip + little-endian float64, C order.
  raw = gzip.decompress((LINEAR / "state.param_states.kernel" / "0.0").read_bytes())
  np.testing.assert_array_equal(kernel, np.frombuffer(raw, "<f8").reshape(10, 5))
  assert kernel.sum() == pytest.approx(26.51389588494382, rel=1e-12)
  # And tensorstore opened directly on the array directory.
  direct = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(
      LINEAR / "state.param_states.kernel") + "/"}, "metadata": {
          "shape": [10, 5], "chunks": [10, 5], "dtype": "<f8",
          "compressor": {"id": "gzip"}}}, open=True, assume_metadata=True).result()
  np.testing.assert_array_equal(kernel, direct.read().result())
  assert isinstance(tree["optimizer"]["state"]["step"], np.int32)  # msgpack ext type 3
  assert ckpt.t5x_checkpoint_step(LINEAR) == 1


def test_linear_fixture_is_not_a_t5_network():
  with pytest.raises(ckpt.CheckpointError, match="token_embedder/embedding.*missing"):
    load.load_pretrained(LINEAR)


@pytest.mark.skipif(not TINY_T5.exists(), reason=f"shared fixture {TINY_T5} absent")
def test_tiny_t5_fixture_loads_with_inferred_config():
  config, params = load.load_pretrained(TINY_T5, dtype="float32")
  assert config == dataclasses.replace(t5.T5_1_1_SIZES["tiny"], dtype="float32")
  assert ckpt.t5x_checkpoint_step(TINY_T5) == 0
  # Flax's own msgpack decoder as the independent reference.
  reference = serialization.msgpack_restore(TINY_T5.read_bytes())["optimizer"]["target"]
  flat, ref = ckpt.flatten_params(params), ckpt.flatten_params(reference)
  assert flat.keys() == ref.keys()
  for name in ref:
    assert flat[name].dtype == np.float32
    np.testing.assert_array_equal(flat[name], ref[name], err_msg=name)
  assert jax.tree.structure(params) == jax.tree.structure(t5.abstract_params(config))


# ---------------------------------------------------------------------------
# Round trips through our own writer.

def _small_params():
  return jax.tree.map(np.asarray, t5.init_params(SMALL, jax.random.key(3)))


def test_mixed_inline_chunked_and_tensorstore_leaves_round_trip(tmp_path):
  params = _small_params()
  flat = ckpt.flatten_params(params)
  stored = dict(flat)
  directory = tmp_path / "checkpoint_7"
  directory.mkdir()
  for i, name in enumerate(["token_embedder/embedding", "decoder/logits_dense/kernel",
                            "encoder/layers_1/attention/query/kernel"]):
    relative = "target." + name.replace("/", ".")
    metadata = _write_zarr(directory / relative, flat[name], keep_zarray=bool(i % 2))
    stored[name] = _spec(relative, flat[name], metadata, driver=("gfile", "file", "gcs")[i])
  wo = flat["decoder/layers_2/mlp/wo/kernel"].reshape(-1)
  stored["decoder/layers_2/mlp/wo/kernel"] = {
      "__msgpack_chunked_array__": True, "shape": {"0": 12, "1": 10},
      "chunks": {"0": wo[:50], "1": wo[50:]}}
  _target_checkpoint(directory, ckpt.unflatten_params(stored))

  config, loaded = ckpt.load_t5x_checkpoint(directory, dtype="float32",
                                            relative_attention_max_distance=128)
  assert config == SMALL
  assert ckpt.t5x_checkpoint_step(directory) == 7
  got = ckpt.flatten_params(loaded)
  assert got.keys() == flat.keys()
  for name in flat:
    np.testing.assert_array_equal(got[name], flat[name], err_msg=name)
  assert load.detect_format(directory) == (load.T5X, str(directory))


def test_version_2_bfloat16_stored_as_uint16(tmp_path):
  values = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], ml_dtypes.bfloat16)
  bits = values.view(np.uint16)
  directory = tmp_path / "ckpt"
  directory.mkdir()
  metadata = _write_zarr(directory / "target.ts", bits)
  tree = {"inline": bits, "ts": _spec("target.ts", bits, metadata)}
  _target_checkpoint(directory, tree, version=2)
  got = ckpt.read_t5x_tree(directory)
  for name in ("inline", "ts"):
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name].astype(np.float32), values.astype(np.float32))
  # In version 3 uint16 means uint16.
  _target_checkpoint(directory, tree, version=3)
  assert ckpt.read_t5x_tree(directory)["inline"].dtype == np.uint16


@pytest.mark.parametrize("version", [None, 0, 1, 4])
def test_unsupported_versions_are_rejected(tmp_path, version):
  tree = {"optimizer": {"target": {}}}
  if version is not None:
    tree["version"] = version
  directory = _write_checkpoint(tmp_path / "ckpt", tree)
  with pytest.raises(ckpt.CheckpointError, match=r"checkpoint.*version"):
    ckpt.read_t5x_tree(directory)


def _raw_leaf_checkpoint(tmp_path, leaf):
  payload = msgpack.packb({"version": 3, "optimizer": {"target": {"w": leaf}}},
                          use_bin_type=True)
  (tmp_path / "checkpoint").write_bytes(payload)
  return tmp_path


@pytest.mark.parametrize("leaf, message", [
    (msgpack.ExtType(2, msgpack.packb((1.0, 2.0))), "ext type 2"),
    (msgpack.ExtType(1, msgpack.packb(([2, 2], "float32", b"\0" * 12), use_bin_type=True)),
     "holds 12 bytes"),
    (msgpack.ExtType(1, msgpack.packb(([1], "object", b"\0" * 8), use_bin_type=True)),
     "unsupported array dtype"),
    (msgpack.ExtType(1, msgpack.packb(([-1], "float32", b""), use_bin_type=True)),
     "integers >= 0"),
    ({"__msgpack_chunked_array__": True, "shape": {"0": 5},
      "chunks": {"0": _ext(1, np.zeros(3, np.float32))}}, "has 3 elements"),
])
def test_corrupt_inline_leaves_name_file_and_leaf(tmp_path, leaf, message):
  directory = _raw_leaf_checkpoint(tmp_path, leaf)
  with pytest.raises(ckpt.CheckpointError, match=message) as info:
    ckpt.read_t5x_tree(directory)
  assert str(directory / "checkpoint") in str(info.value)
  assert "optimizer/target/w" in str(info.value)


def test_shape_mismatch_names_the_parameter(tmp_path):
  flat = ckpt.flatten_params(_small_params())
  flat["decoder/layers_1/mlp/wo/kernel"] = np.zeros((13, 10), np.float32)
  directory = _target_checkpoint(tmp_path / "ckpt", ckpt.unflatten_params(flat))
  with pytest.raises(ckpt.CheckpointError, match=r"decoder/layers_1/mlp/wo/kernel: shape "
                     r"\[13, 10\] does not match \[12, 10\]"):
    ckpt.load_t5x_checkpoint(directory)


def test_missing_and_unexpected_parameters_are_listed(tmp_path):
  flat = ckpt.flatten_params(_small_params())
  del flat["encoder/layers_1/pre_mlp_layer_norm/scale"]
  flat["encoder/layers_1/extra/kernel"] = np.zeros((2, 2), np.float32)
  directory = _target_checkpoint(tmp_path / "ckpt", ckpt.unflatten_params(flat))
  with pytest.raises(ckpt.CheckpointError, match=r"missing 1: encoder/layers_1/pre_mlp_layer_norm"
                     r"/scale; unexpected 1: encoder/layers_1/extra/kernel"):
    ckpt.load_t5x_checkpoint(directory)


def test_t5_1_0_layout_is_rejected_clearly(tmp_path):
  flat = ckpt.flatten_params(_small_params())
  for stack, n in (("encoder", 2), ("decoder", 3)):
    for i in range(n):
      flat[f"{stack}/layers_{i}/mlp/wi/kernel"] = flat.pop(f"{stack}/layers_{i}/mlp/wi_0/kernel")
      del flat[f"{stack}/layers_{i}/mlp/wi_1/kernel"]
  directory = _target_checkpoint(tmp_path / "ckpt", ckpt.unflatten_params(flat))
  with pytest.raises(ckpt.CheckpointError, match="T5 1.0"):
    ckpt.load_t5x_checkpoint(directory)


# ---------------------------------------------------------------------------
# Hostile tensorstore specs.

VICTIM = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.fixture
def layout(tmp_path):
  """A checkpoint directory and, next to it, a readable zarr array outside it."""
  directory = tmp_path / "ckpt"
  directory.mkdir()
  outside = tmp_path / "outside"
  outside.mkdir()
  metadata = _write_zarr(outside / "w", VICTIM)
  return directory, outside, metadata


def _read_single(directory, spec):
  _target_checkpoint(directory, {"w": spec})
  return ckpt.read_t5x_tree(directory)["w"]


def _hostile_spec(case, directory, outside, metadata):
  spec = _spec("w", VICTIM, metadata)
  if case == "absolute":
    spec["kvstore"]["path"] = str(outside / "w")
  elif case == "dotdot":
    spec["kvstore"]["path"] = "sub/../../outside/w"
  elif case == "dotdot_legacy_top_level":
    del spec["kvstore"]["path"]
    spec["path"] = "../outside/w"
  elif case == "symlink_dir":
    os.symlink(outside / "w", directory / "w")
  elif case == "symlink_chunk":
    _write_zarr(directory / "w", np.zeros_like(VICTIM))
    os.remove(directory / "w" / "0.0")
    os.symlink(outside / "w" / "0.0", directory / "w" / "0.0")
  elif case == "http_kvstore":
    spec["kvstore"] = {"driver": "http", "base_url": "http://example.com", "path": "w"}
  elif case == "memory_kvstore":
    spec["kvstore"] = {"driver": "memory", "path": "w"}
  elif case == "kvstore_url":
    spec["kvstore"] = "file://" + str(outside / "w")
  elif case == "context":
    spec["context"] = {"file_io_concurrency": {"limit": 1}}
  elif case == "kvstore_context":
    spec["kvstore"]["context"] = {}
  elif case == "n5_driver":
    spec["driver"] = "n5"
  elif case == "json_driver":
    spec = {"driver": "json", "kvstore": {"driver": "file", "path": "w"}}
  elif case == "both_paths":
    spec["path"] = "other"
  elif case == "missing_dir":
    spec["kvstore"]["path"] = "target.absent"
  elif case == "root_itself":
    spec["kvstore"]["path"] = "/"
  return spec


@pytest.mark.parametrize("case, message", [
    ("absolute", "is absolute"),
    ("dotdot", r"'\.\.' component"),
    ("dotdot_legacy_top_level", r"'\.\.' component"),
    ("symlink_dir", "outside the checkpoint directory"),
    ("symlink_chunk", "outside the checkpoint directory"),
    ("http_kvstore", "kvstore driver 'http' is not allowed"),
    ("memory_kvstore", "kvstore driver 'memory' is not allowed"),
    ("kvstore_url", "kvstore must be a dict"),
    ("context", "'context'; not allowed"),
    ("kvstore_context", "'context'; not allowed"),
    ("n5_driver", "array driver 'n5' is not allowed"),
    ("json_driver", "array driver 'json' is not allowed"),
    ("both_paths", "both kvstore.path and a top-level path"),
    ("missing_dir", "does not exist"),
    ("root_itself", "non-empty relative string"),
])
def test_hostile_specs_are_rejected(layout, case, message):
  directory, outside, metadata = layout
  spec = _hostile_spec(case, directory, outside, metadata)
  with pytest.raises(ckpt.CheckpointError, match=message) as info:
    _read_single(directory, spec)
  assert str(directory / "checkpoint") in str(info.value)
  assert "optimizer/target/w" in str(info.value)


def test_symlink_inside_the_checkpoint_is_allowed(layout):
  directory, _, _ = layout
  metadata = _write_zarr(directory / "real", VICTIM)
  os.symlink(directory / "real", directory / "alias")
  np.testing.assert_array_equal(_read_single(directory, _spec("alias", VICTIM, metadata)), VICTIM)


def test_gcs_spec_with_bucket_reads_the_local_copy(layout):
  directory, _, _ = layout
  local = VICTIM + 100
  metadata = _write_zarr(directory / "target.w", local, keep_zarray=False)
  spec = _spec("target.w", local, metadata, driver="gcs")
  spec["kvstore"]["bucket"] = "someone-elses-bucket"
  np.testing.assert_array_equal(_read_single(directory, spec), local)


def test_legacy_top_level_path(layout):
  directory, _, _ = layout
  metadata = _write_zarr(directory / "target.w", VICTIM + 1, keep_zarray=False)
  spec = {"driver": "zarr", "dtype": "float32", "path": "target.w/",
          "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}, "metadata": metadata}
  np.testing.assert_array_equal(_read_single(directory, spec), VICTIM + 1)


def test_spec_shape_must_match_stored_metadata(layout):
  directory, _, _ = layout
  metadata = _write_zarr(directory / "target.w", VICTIM)
  spec = _spec("target.w", VICTIM, dict(metadata, shape=[3, 2]))
  with pytest.raises(ckpt.CheckpointError, match="optimizer/target/w"):
    _read_single(directory, spec)


# ---------------------------------------------------------------------------
# Format detection.

def test_detect_format_messages(tmp_path):
  orbax = tmp_path / "orbax"
  orbax.mkdir()
  (orbax / "checkpoint").write_bytes(b"")
  (orbax / "_METADATA").write_text("{}")
  with pytest.raises(ckpt.CheckpointError, match="Orbax checkpoint .*not supported yet"):
    load.load_pretrained(orbax)
  with pytest.raises(ckpt.CheckpointError, match="Orbax checkpoint .*not supported yet"):
    ckpt.load_t5x_checkpoint(orbax / "checkpoint")
  os.remove(orbax / "checkpoint")
  with pytest.raises(ckpt.CheckpointError, match="Orbax checkpoint .*not supported yet"):
    load.load_pretrained(orbax)
  tf_ckpt = tmp_path / "tf"
  tf_ckpt.mkdir()
  (tf_ckpt / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-1"\n')
  with pytest.raises(ckpt.CheckpointError, match="TensorFlow checkpoint"):
    load.load_pretrained(tf_ckpt)
  model_dir = tmp_path / "model"
  (model_dir / "checkpoint_10").mkdir(parents=True)
  (model_dir / "checkpoint_200").mkdir()
  with pytest.raises(ckpt.CheckpointError, match=r"steps \[10, 200\].*checkpoint_200"):
    load.load_pretrained(model_dir)
  with pytest.raises(ckpt.CheckpointError, match="does not exist"):
    load.load_pretrained(tmp_path / "nothing")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ckpt.CheckpointError, match="not a Hugging Face"):
    load.load_pretrained(empty)


# ---------------------------------------------------------------------------
# Import limits: nothing is allocated for what the files cannot hold.

def _ts_spec(relative, shape, chunks=None, dtype="float32", compressor=None):
  return {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": relative},
          "metadata": {"shape": shape, "chunks": chunks or shape,
                       "compressor": compressor or {"id": "gzip"}}}


def _expect_error(directory, match, **kwargs):
  with pytest.raises(ckpt.CheckpointError, match=match) as info:
    ckpt.read_t5x_tree(directory, **kwargs)
  assert str(directory / "checkpoint") in str(info.value)
  assert "optimizer/target/w" in str(info.value)
  return info.value


@pytest.mark.parametrize("shape, message", [
    # 64 GiB is within the default max_bytes, but there is no chunk to read.
    ([2**17, 2**17], r"chunk file target\.w/0\.0 is missing \(0 of 1 chunk"),
    # 2**66 bytes: past int64, and past the default max_bytes.
    ([2**32, 2**32], "declares 73,786,976,294,838,206,464 bytes.*over max_bytes=68,719,476,736"),
])
def test_huge_shape_over_an_empty_array_dir_is_refused_before_allocation(tmp_path, shape,
                                                                          message):
  # A few hundred bytes of msgpack declaring a huge array.
  directory = tmp_path / "ckpt"
  (directory / "target.w").mkdir(parents=True)
  _target_checkpoint(directory, {"w": _ts_spec("target.w", shape)})
  _expect_error(directory, message)
  if shape == [2**17, 2**17]:
    # A grid of 2**34 one-element chunks is not listed key by key.
    _target_checkpoint(directory, {"w": _ts_spec("target.w", shape, chunks=[1, 1])})
    _expect_error(directory, r"target\.w/0\.0 is missing \(0 of 17,179,869,184 chunk files")
  error = _expect_error(directory, "over max_bytes=1,000,000", max_bytes=10**6)
  assert f"declares {4 * shape[0] * shape[1]:,} bytes" in str(error)


def test_huge_inline_shape_does_not_overflow_the_size_check(tmp_path):
  leaf = msgpack.ExtType(1, msgpack.packb(([2**32, 2**32], "float32", b""), use_bin_type=True))
  directory = _raw_leaf_checkpoint(tmp_path, leaf)
  _expect_error(directory, r"holds 0 bytes, shape \[4294967296, 4294967296\] of float32 needs "
                f"{4 * 2**64}")


def test_max_bytes_counts_every_leaf_before_reading(tmp_path):
  directory = tmp_path / "ckpt"
  directory.mkdir()
  array = np.ones((100, 40), np.float32)
  metadata = _write_zarr(directory / "target.w", array)  # 16,000 bytes
  tree = {"a": np.zeros(4, np.float32), "w": _spec("target.w", array, metadata)}  # 16 + 16,000
  _target_checkpoint(directory, tree)
  assert ckpt.read_t5x_tree(directory, max_bytes=16016)["w"].shape == (100, 40)
  _expect_error(directory, "declares 16,000 bytes, which brings the arrays read to 16,016 bytes, "
                "over max_bytes=16,015", max_bytes=16015)


def test_checkpoint_file_over_max_bytes_is_not_read(tmp_path):
  directory = _target_checkpoint(tmp_path / "ckpt", {"w": np.zeros(64, np.float32)})
  with pytest.raises(ckpt.CheckpointError, match="over max_bytes=100"):
    ckpt.read_t5x_tree(directory, max_bytes=100)


@pytest.mark.parametrize("keep_zarray", [True, False])
def test_missing_chunk_file_is_an_error_not_zeros(tmp_path, keep_zarray):
  directory = tmp_path / "ckpt"
  directory.mkdir()
  array = np.arange(1, 25, dtype=np.float32).reshape(4, 6)
  metadata = _write_zarr(directory / "target.w", array, keep_zarray=keep_zarray)
  metadata["chunks"] = [2, 3]
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                 "path": str(directory / "target.w") + "/"},
                   "metadata": dict(metadata, dtype="<f4")}, create=True,
                  delete_existing=True).result()
  store.write(array).result()
  if not keep_zarray:
    os.remove(directory / "target.w" / ".zarray")
  spec = _spec("target.w", array, metadata)
  _target_checkpoint(directory, {"w": spec})
  np.testing.assert_array_equal(ckpt.read_t5x_tree(directory)["w"], array)
  os.remove(directory / "target.w" / "1.1")
  (directory / "target.w" / "01.1").write_bytes(b"")  # not a zarr chunk name; does not count
  _expect_error(directory, r"chunk file target\.w/1\.1 is missing \(3 of 4 chunk files")


def test_nested_dimension_separator_chunks_are_found(tmp_path):
  directory = tmp_path / "ckpt"
  directory.mkdir()
  array = np.arange(24, dtype=np.float32).reshape(4, 6)
  metadata = {"shape": [4, 6], "chunks": [2, 3], "compressor": {"id": "gzip"},
              "dimension_separator": "/"}
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                 "path": str(directory / "target.w") + "/"},
                   "metadata": dict(metadata, dtype="<f4")}, create=True).result()
  store.write(array).result()
  assert (directory / "target.w" / "1" / "1").is_file()
  _target_checkpoint(directory, {"w": _spec("target.w", array, metadata)})
  np.testing.assert_array_equal(ckpt.read_t5x_tree(directory)["w"], array)
  os.remove(directory / "target.w" / "0" / "1")
  _expect_error(directory, r"chunk file target\.w/0/1 is missing")


def test_chunk_files_too_small_for_their_chunk(tmp_path):
  directory = tmp_path / "ckpt"
  (directory / "target.w").mkdir(parents=True)
  # Uncompressed chunks must be exactly their size.
  (directory / "target.w" / "0.0").write_bytes(b"\0" * 20)
  _target_checkpoint(directory, {"w": dict(_ts_spec("target.w", [2, 3]),
                                           metadata={"shape": [2, 3], "chunks": [2, 3],
                                                     "compressor": None})})
  _expect_error(directory, r"target\.w/0\.0 holds 20 bytes; an uncompressed chunk \[2, 3\] of "
                "float32 is 24")
  # 100 gzip bytes cannot inflate to a 64 MiB chunk.
  (directory / "target.w" / "0.0").write_bytes(gzip.compress(b"\0" * 1000)[:100].ljust(100, b"\0"))
  _target_checkpoint(directory, {"w": _ts_spec("target.w", [4096, 4096])})
  _expect_error(directory, r"holds 100 compressed bytes, too few for a chunk \[4096, 4096\] of "
                r"float32 \(67,108,864 bytes; gzip expands at most 1032x\)")


@pytest.mark.parametrize("field, value, message", [
    ("shape", [3, 2], r"target\.w/\.zarray declares shape \[3, 2\], the spec \[2, 3\]"),
    ("dtype", "<f8", r"target\.w/\.zarray declares dtype '<f8', the spec float32"),
    ("filters", [{"id": "delta"}], r"zarr filters are not supported \(target\.w/\.zarray\)"),
    ("zarr_format", 3, r"target\.w/\.zarray is not a zarr v2 metadata object"),
])
def test_stored_zarr_metadata_must_agree_with_the_spec(layout, field, value, message):
  directory, _, _ = layout
  metadata = _write_zarr(directory / "target.w", VICTIM)
  zarray = directory / "target.w" / ".zarray"
  stored = json.loads(zarray.read_text())
  stored[field] = value
  zarray.write_text(json.dumps(stored))
  _target_checkpoint(directory, {"w": _spec("target.w", VICTIM, metadata)})
  _expect_error(directory, message)


@pytest.mark.parametrize("depth", [100, 600, 1015])  # msgpack itself refuses over 1024
def test_deep_msgpack_nesting_is_a_checkpoint_error(tmp_path, depth):
  # Written by hand: msgpack's packer refuses this depth. 0x81 0xa1 'x' = {"x": ...}.
  nested = b"\x81\xa1x" * depth + msgpack.packb(1.0)
  prefix = msgpack.packb({"version": 3, "optimizer": {"target": {"w": None}}})
  assert prefix.endswith(b"\xc0")  # the None, replaced by the nested map
  directory = tmp_path / "ckpt"
  directory.mkdir()
  (directory / "checkpoint").write_bytes(prefix[:-1] + nested)
  with pytest.raises(ckpt.CheckpointError, match=f"nested deeper than {ckpt.MAX_NESTING_DEPTH} "
                     "levels") as info:
    ckpt.read_t5x_tree(directory)
  assert str(directory / "checkpoint") in str(info.value)
  assert "optimizer/target/w/x/x" in str(info.value)


@pytest.mark.parametrize("bad, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"),
                                        (1e39, "inf")])  # 1e39 overflows the float32 cast
def test_nonfinite_parameters_are_refused_unless_allowed(tmp_path, bad, shown):
  flat = {name: value.astype(np.float64) for name, value in
          ckpt.flatten_params(_small_params()).items()}
  flat["encoder/layers_1/mlp/wo/kernel"][3, 4] = bad
  directory = _target_checkpoint(tmp_path / "ckpt", ckpt.unflatten_params(flat))
  with pytest.raises(ckpt.CheckpointError, match=r"encoder/layers_1/mlp/wo/kernel: 1 non-finite "
                     fr"value\(s\), the first {shown} at index \[3, 4\].*allow_nonfinite=True"):
    load.load_pretrained(directory)
  _, params = load.load_pretrained(directory, allow_nonfinite=True)
  assert not np.isfinite(params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"][3, 4])
