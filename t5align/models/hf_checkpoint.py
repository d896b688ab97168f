"""Reader (and inverse mapping) for Hugging Face T5 v1.1 / Flan-T5 checkpoints.

A Hugging Face model directory holds ``config.json`` and either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Tensors are read with the
numpy API of ``safetensors`` (no torch, no pickle-based ``.bin`` files).

Names follow ``hf_name_table``: HF PyTorch ``nn.Linear`` weights are
``[out, in]``, our kernels ``[in, out]``, so every kernel and the relative
position tables are transposed; layer-norm scales and the embedding are not.

Output head conventions differ across ``transformers`` versions:

* 4.x: ``tie_word_embeddings`` (default true) ties ``lm_head`` to ``shared``
  *and* scales the decoder output by ``d_model**-0.5`` (T5 1.0); v1.1
  checkpoints say ``false``: separate ``lm_head``, no scaling.
* 5.x: the scaling has its own flag ``scale_decoder_outputs`` (derived from
  the original ``tie_word_embeddings``), ``tie_word_embeddings`` is always
  written as true, and an ``lm_head.weight`` present in the files with values
  different from ``shared.weight`` stays untied.

So: ``lm_head.weight`` is used when present, otherwise ``shared.weight`` when
the config ties; the decoder-output scale (``scale_decoder_outputs`` if
present, else ``tie_word_embeddings``) is folded into ``logits_dense`` --
exact, because ``(x * s) @ W == x @ (s * W)``. After loading, the embedding
and ``logits_dense`` are separate parameters, as in T5 v1.1 training.
Only the gated-GeLU (v1.1) feed-forward is supported.

Limits: ``config.json`` values are checked by type and range before anything
is built from them (``_INT_FIELDS`` gives the ranges: far above every released
T5, far below what would exhaust memory; flags must be JSON booleans); the
safetensors files together may hold at most ``max_bytes`` (default
``t5x_checkpoint.DEFAULT_MAX_BYTES``), checked before any is opened, and
safetensors itself checks every declared shape against the bytes of its file;
NaN and Inf weights are refused unless ``allow_nonfinite=True``. Every
failure is a ``CheckpointError`` naming the file and the field or tensor.
"""

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np
from safetensors import safe_open

from t5align.models import t5
from t5align.models.t5x_checkpoint import (DEFAULT_MAX_BYTES, CheckpointError, check_finite,
                                           check_t5_params, flatten_params, unflatten_params)

CONFIG_FILENAME = "config.json"
SAFETENSORS_FILENAME = "model.safetensors"
SAFETENSORS_INDEX_FILENAME = "model.safetensors.index.json"

_EMBEDDING = "shared.weight"
_LM_HEAD = "lm_head.weight"
# Copies of `shared.weight` that some savers write; they must equal it.
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in some released T5 files but unused by the network (HF ignores it too).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_ATTENTION = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
_MLP = ("wi_0", "wi_1", "wo")
_MODEL_TYPES = ("t5", "mt5")
_GATED_GELU = ("gated-gelu", "gated-gelu_new")
# config.json field -> (least, most). mT5-XXL, the largest released T5, has a
# 250,112-token vocabulary, d_model 4096, d_ff 10,240 and 24 layers.
_INT_FIELDS = {
    "vocab_size": (1, 2**22), "d_model": (1, 2**16), "num_heads": (1, 2**10),
    "d_kv": (1, 2**12), "d_ff": (1, 2**18), "num_layers": (1, 2**10),
    "num_decoder_layers": (1, 2**10), "relative_attention_num_buckets": (2, 2**12),
    "relative_attention_max_distance": (1, 2**20)}
# config.json and the shard index are small JSON files (an index is ~100 KB).
_MAX_JSON_BYTES = 64 * 2**20


def _attention_rows(ours: str, hf: str) -> list:
  return [(f"{ours}/{a}/kernel", f"{hf}.{b}.weight", True) for a, b in _ATTENTION]


def _mlp_rows(ours: str, hf: str) -> list:
  return [(f"{ours}/{m}/kernel", f"{hf}.{m}.weight", True) for m in _MLP]


def hf_name_table(config: t5.T5Config) -> list[tuple[str, str, bool]]:
  """``(our name, HF PyTorch name, transpose)`` for every parameter of ``config``."""
  rows = [("token_embedder/embedding", _EMBEDDING, False),
          ("encoder/relpos_bias/rel_embedding",
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)]
  for i in range(config.num_encoder_layers):
    ours, hf = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    rows.append((f"{ours}/pre_attention_layer_norm/scale", f"{hf}.0.layer_norm.weight", False))
    rows += _attention_rows(f"{ours}/attention", f"{hf}.0.SelfAttention")
    rows.append((f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.1.layer_norm.weight", False))
    rows += _mlp_rows(f"{ours}/mlp", f"{hf}.1.DenseReluDense")
  rows.append(("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight", False))
  rows.append(("decoder/relpos_bias/rel_embedding",
               "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True))
  for i in range(config.num_decoder_layers):
    ours, hf = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    rows.append((f"{ours}/pre_self_attention_layer_norm/scale", f"{hf}.0.layer_norm.weight",
                 False))
    rows += _attention_rows(f"{ours}/self_attention", f"{hf}.0.SelfAttention")
    rows.append((f"{ours}/pre_cross_attention_layer_norm/scale", f"{hf}.1.layer_norm.weight",
                 False))
    rows += _attention_rows(f"{ours}/encoder_decoder_attention", f"{hf}.1.EncDecAttention")
    rows.append((f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.2.layer_norm.weight", False))
    rows += _mlp_rows(f"{ours}/mlp", f"{hf}.2.DenseReluDense")
  rows.append(("decoder/decoder_norm/scale", "decoder.final_layer_norm.weight", False))
  rows.append(("decoder/logits_dense/kernel", _LM_HEAD, True))
  return rows


def config_from_hf(hf: Mapping[str, Any], *, source: str, **overrides) -> t5.T5Config:
  """``T5Config`` from a parsed ``config.json``; rejects non-v1.1 architectures."""
  def get(key, default=None, required=False):
    if key not in hf or hf[key] is None:
      if required:
        raise CheckpointError(source, key, "missing from the Hugging Face config")
      return default
    return hf[key]

  def integer(key, default=None, required=False):
    value = get(key, default, required)
    least, most = _INT_FIELDS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
      raise CheckpointError(source, key, f"expected an integer in [{least}, {most}], got "
                            f"{value!r:.40}")
    return value

  def number(key, default, least, below, *, include_least):
    value = get(key, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (least <= value if include_least else least < value) and value < below)
    if not ok:
      interval = f"{'[' if include_least else '('}{least}, {below})"
      raise CheckpointError(source, key, f"expected a number in {interval}, got {value!r:.40}")
    return float(value)

  model_type = get("model_type", required=True)
  if model_type not in _MODEL_TYPES:
    raise CheckpointError(source, "model_type", f"{model_type!r} is not supported (only "
                          f"{', '.join(_MODEL_TYPES)}: T5 v1.1 / Flan-T5 / mT5)")
  feed_forward = get("feed_forward_proj", "relu")
  if feed_forward not in _GATED_GELU:
    raise CheckpointError(source, "feed_forward_proj", f"{feed_forward!r}: only the T5 v1.1 "
                          "gated-GeLU feed-forward ('gated-gelu') is supported; T5 1.0 "
                          "checkpoints (ReLU MLP, tied embeddings) are not")
  for key, want in (("pad_token_id", t5.PAD_ID), ("decoder_start_token_id", t5.DECODER_START_ID),
                    ("eos_token_id", t5.EOS_ID)):
    value = get(key, want)
    if value != want and not (key == "eos_token_id" and isinstance(value, list)
                              and want in value):
      raise CheckpointError(source, key, f"is {value!r}; this model hard-codes {want}")
  num_layers = integer("num_layers", required=True)
  fields = dict(
      vocab_size=integer("vocab_size", required=True),
      emb_dim=integer("d_model", required=True), num_heads=integer("num_heads", required=True),
      head_dim=integer("d_kv", required=True), mlp_dim=integer("d_ff", required=True),
      num_encoder_layers=num_layers,
      num_decoder_layers=integer("num_decoder_layers", num_layers),
      relative_attention_num_buckets=integer("relative_attention_num_buckets", 32),
      relative_attention_max_distance=integer("relative_attention_max_distance", 128),
      dropout_rate=number("dropout_rate", 0.1, 0.0, 1.0, include_least=True),
      layer_norm_epsilon=number("layer_norm_epsilon", 1e-6, 0.0, 1.0, include_least=False))
  fields.update(overrides)
  try:
    return t5.T5Config(**fields)
  except ValueError as e:
    raise CheckpointError(source, None, f"invalid T5 dimensions: {e}") from e


def _head_convention(hf: Mapping[str, Any], source: str) -> tuple[bool, bool]:
  """(lm_head falls back to the embedding, decoder output scaled by d_model**-0.5)."""
  def flag(key, default):
    value = hf.get(key)
    if value is None:
      return default
    if not isinstance(value, bool):  # the string "false" would otherwise read as true
      raise CheckpointError(source, key, f"expected true or false, got {value!r:.40}")
    return value

  tied = flag("tie_word_embeddings", True)
  return tied, flag("scale_decoder_outputs", tied)


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], config: t5.T5Config, *,
                       tie_word_embeddings: bool = False, scale_decoder_outputs: bool = False,
                       source: str = "<state dict>",
                       files: Optional[Mapping[str, str]] = None,
                       allow_nonfinite: bool = False) -> dict:
  """Our float32 parameter tree from HF PyTorch-named arrays.

  Args:
    tensors: HF name -> array (any float dtype).
    config: the network the arrays must describe.
    tie_word_embeddings: use ``shared.weight`` when ``lm_head.weight`` is absent.
    scale_decoder_outputs: fold HF's ``d_model**-0.5`` decoder-output scale
      into ``logits_dense``.
    source: named in errors; ``files`` maps tensor names to their shard file.
    allow_nonfinite: accept NaN and Inf values (refused by default).
  """
  files = files or {}

  def where(name):
    return files.get(name, source)

  tensors = dict(tensors)
  for name in _IGNORED:
    tensors.pop(name, None)
  if _EMBEDDING not in tensors:
    present = [c for c in _EMBEDDING_COPIES if c in tensors]
    if not present:
      raise CheckpointError(source, _EMBEDDING, "missing (nor found as "
                            f"{' or '.join(_EMBEDDING_COPIES)})")
    tensors[_EMBEDDING] = tensors[present[0]]
  for copy in _EMBEDDING_COPIES:
    if copy in tensors:
      if not np.array_equal(tensors.pop(copy), tensors[_EMBEDDING]):
        raise CheckpointError(where(copy), copy, f"differs from {_EMBEDDING}; separate "
                              "encoder/decoder input embeddings are not supported")
  if _LM_HEAD not in tensors:
    if not tie_word_embeddings:
      raise CheckpointError(source, _LM_HEAD, "missing and the config does not tie it to "
                            f"{_EMBEDDING} (tie_word_embeddings is false)")
    tensors[_LM_HEAD] = tensors[_EMBEDDING]

  table = hf_name_table(config)
  expected = {name: s.shape for name, s in flatten_params(t5.abstract_params(config)).items()}
  unexpected = sorted(tensors.keys() - {hf for _, hf, _ in table})
  missing = sorted({hf for _, hf, _ in table} - tensors.keys())
  if unexpected:
    raise CheckpointError(where(unexpected[0]), unexpected[0], f"unexpected tensor for {config} "
                          f"({len(unexpected)} unexpected: {', '.join(unexpected[:8])})")
  if missing:
    raise CheckpointError(source, missing[0], f"missing tensor for {config} ({len(missing)} "
                          f"missing: {', '.join(missing[:8])})")
  flat = {}
  for ours, hf, transpose in table:
    value = np.asarray(tensors[hf])
    want = tuple(reversed(expected[ours])) if transpose else tuple(expected[ours])
    if value.shape != want:
      raise CheckpointError(where(hf), hf, f"shape {list(value.shape)} does not match "
                            f"{list(want)} expected for {ours} of {config}")
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise CheckpointError(where(hf), hf, f"dtype {value.dtype} is not a floating-point type")
    value = value.astype(np.float32)
    if not allow_nonfinite:
      check_finite(value, source=where(hf), name=hf)
    flat[ours] = np.ascontiguousarray(value.T) if transpose else value
  if scale_decoder_outputs:
    flat["decoder/logits_dense/kernel"] = (
        flat["decoder/logits_dense/kernel"] * np.float32(config.emb_dim ** -0.5))
  # Checked above under their HF names and files; the scale keeps finite values finite.
  return check_t5_params(unflatten_params(flat), config, source=source, allow_nonfinite=True)


def to_hf_state_dict(params: Mapping, config: t5.T5Config) -> dict[str, np.ndarray]:
  """HF PyTorch-named float32 arrays for ``params`` (inverse of ``from_hf_state_dict``).

  Includes the tied copies ``encoder.embed_tokens.weight`` and
  ``decoder.embed_tokens.weight`` and a separate ``lm_head.weight``, i.e. the
  keys of ``T5ForConditionalGeneration.state_dict()`` for an untied,
  unscaled (v1.1) head.
  """
  flat = flatten_params(params)
  out = {}
  for ours, hf, transpose in hf_name_table(config):
    value = np.asarray(flat[ours], dtype=np.float32)
    out[hf] = np.ascontiguousarray(value.T) if transpose else value
  for copy in _EMBEDDING_COPIES:
    out[copy] = out[_EMBEDDING]
  return out


def hf_config(config: t5.T5Config) -> dict:
  """The ``config.json`` of ``config`` as a T5 v1.1 checkpoint writes it (untied head)."""
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
      "d_ff": config.mlp_dim, "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
      "scale_decoder_outputs": False, "is_encoder_decoder": True, "pad_token_id": t5.PAD_ID,
      "eos_token_id": t5.EOS_ID, "decoder_start_token_id": t5.DECODER_START_ID}


def save_hf_checkpoint(directory: str, params: Mapping, config: t5.T5Config) -> None:
  """Writes ``config.json`` and one ``model.safetensors`` that ``load_hf_checkpoint`` reads.

  Files are written under temporary names and renamed, so a killed save never
  leaves a half-written checkpoint under the final names.
  """
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  tensors = to_hf_state_dict(params, config)
  for copy in _EMBEDDING_COPIES:  # the reader accepts them; one copy keeps files small
    del tensors[copy]
  weights = os.path.join(directory, SAFETENSORS_FILENAME)
  save_file(tensors, weights + ".tmp", metadata={"format": "np"})
  with open(os.path.join(directory, CONFIG_FILENAME + ".tmp"), "w") as f:
    json.dump(hf_config(config), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(weights + ".tmp", weights)
  os.replace(os.path.join(directory, CONFIG_FILENAME + ".tmp"),
             os.path.join(directory, CONFIG_FILENAME))


def _shard_path(directory: str, filename: Any, source: str, field: str) -> str:
  """Path of a shard named in the index, which must be a plain file name in ``directory``.

  The index may not name other paths. Symlinks placed in the directory itself
  are followed: the Hugging Face Hub cache links every file to a blob.
  """
  if (not isinstance(filename, str) or not filename or os.path.basename(filename) != filename
      or filename in (".", "..")):
    raise CheckpointError(source, field, f"shard file {filename!r} must be a plain file name in "
                          "the model directory")
  path = os.path.join(directory, filename)
  if not os.path.isfile(path):
    raise CheckpointError(source, field, f"shard file {filename!r} does not exist")
  return path


def _read_json(path: str, field: Optional[str], what: str) -> Any:
  try:
    size = os.path.getsize(path)
    if size > _MAX_JSON_BYTES:
      raise CheckpointError(path, field, f"{what} of {size:,} bytes is over the "
                            f"{_MAX_JSON_BYTES:,} bytes such a file can need")
    with open(path, "rb") as f:
      return json.loads(f.read())
  except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
    raise CheckpointError(path, field, f"unreadable {what}: {e}") from e


def read_hf_tensors(directory: str, *,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict[str, np.ndarray],
                                                                 dict[str, str]]:
  """All tensors of a HF model directory: (name -> array, name -> file).

  Reads ``model.safetensors`` if present (as ``transformers`` does), else the
  shards of ``model.safetensors.index.json``; every shard must hold exactly
  the tensors the index assigns to it. The shard files may hold at most
  ``max_bytes`` together.
  """
  directory = os.fspath(directory)
  single = os.path.join(directory, SAFETENSORS_FILENAME)
  index_path = os.path.join(directory, SAFETENSORS_INDEX_FILENAME)
  if os.path.isfile(single):
    assignment = None
    shards = [single]
  elif os.path.isfile(index_path):
    index = _read_json(index_path, "weight_map", "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise CheckpointError(index_path, "weight_map", "must map tensor names to shard files")
    assignment = {name: _shard_path(directory, shard, index_path, f"weight_map[{name!r}]")
                  for name, shard in weight_map.items()}
    shards = sorted(set(assignment.values()))
  else:
    raise CheckpointError(directory, None, f"no {SAFETENSORS_FILENAME} or "
                          f"{SAFETENSORS_INDEX_FILENAME} (pickle-based .bin weights are not read)")
  total = sum(os.path.getsize(shard) for shard in shards)
  if total > max_bytes:
    raise CheckpointError(directory, None, f"safetensors files of {total:,} bytes are over "
                          f"max_bytes={max_bytes:,}; pass a larger max_bytes if the checkpoint "
                          "really is that large")
  tensors, files = {}, {}
  for shard in shards:
    try:
      with safe_open(shard, framework="np") as f:
        for name in f.keys():
          if name in tensors:
            raise CheckpointError(shard, name, f"tensor also stored in {files[name]}")
          if assignment is not None and assignment.get(name) != shard:
            raise CheckpointError(shard, name, f"tensor not assigned to this shard by "
                                  f"{SAFETENSORS_INDEX_FILENAME}")
          tensors[name] = f.get_tensor(name)
          files[name] = shard
    except CheckpointError:
      raise
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
      raise CheckpointError(shard, None, f"unreadable safetensors file: {e}") from e
  if assignment is not None:
    absent = sorted(assignment.keys() - tensors.keys())
    if absent:
      raise CheckpointError(assignment[absent[0]], absent[0], "listed in "
                            f"{SAFETENSORS_INDEX_FILENAME} but not in the shard")
  return tensors, files


def read_hf_config(directory: str) -> dict:
  path = os.path.join(os.fspath(directory), CONFIG_FILENAME)
  config = _read_json(path, None, "Hugging Face config")
  if not isinstance(config, dict):
    raise CheckpointError(path, None, "config.json must hold a JSON object")
  return config


def load_hf_checkpoint(directory: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                       allow_nonfinite: bool = False,
                       **config_overrides) -> tuple[t5.T5Config, dict]:
  """``(T5Config, float32 numpy params)`` from a HF T5 v1.1 / Flan-T5 directory.

  ``config_overrides`` (e.g. ``dtype='float32'``, ``dropout_rate=0.0``)
  replace values from ``config.json``. The safetensors files may hold at most
  ``max_bytes`` (the float32 copy comes on top); NaN or Inf weights are
  refused unless ``allow_nonfinite``. Raises ``CheckpointError``.
  """
  config_path = os.path.join(os.fspath(directory), CONFIG_FILENAME)
  hf = read_hf_config(directory)
  config = config_from_hf(hf, source=config_path, **config_overrides)
  tied, scaled = _head_convention(hf, config_path)
  tensors, files = read_hf_tensors(directory, max_bytes=max_bytes)
  return config, from_hf_state_dict(tensors, config, tie_word_embeddings=tied,
                                    scale_decoder_outputs=scaled, source=os.fspath(directory),
                                    files=files, allow_nonfinite=allow_nonfinite)
