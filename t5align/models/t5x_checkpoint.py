"""Reader for legacy T5X checkpoints (the public ``gs://t5-data/.../t5x/...`` format).

A legacy checkpoint is a directory ``checkpoint_<step>/`` holding a msgpack file
named ``checkpoint``; the file decodes to::

  {'version': 3, 'optimizer': {'target': params,
                               'state': {'step': ..., 'param_states': ...}}}

Each array leaf is either inlined in the msgpack stream (flax's encoding: ext
type 1 = ndarray, ext type 3 = numpy scalar, both carrying a nested msgpack
``(shape, dtype name, C-order bytes)``; arrays over 1 GiB are split into
``{'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}``) or a
tensorstore spec dict pointing at a gzip'd zarr v2 directory next to the file,
e.g. ``{'driver': 'zarr', 'dtype': 'float32', 'kvstore': {'driver': 'gfile',
'path': 'target.encoder.layers_0.attention.query.kernel'}, 'metadata':
{'shape': [512, 384], 'chunks': [512, 384], 'compressor': {'id': 'gzip'}}}``.
Version 3 stores bfloat16 natively; version 2 stored it as uint16 (we
reinterpret those bits); older versions are rejected.

We decode msgpack ourselves (no pickle; only ext types 1 and 3) and never pass
a spec from the file to tensorstore. T5X joins the spec path onto the directory
unchecked, so a hostile file could name ``/etc/...``, ``../..``, a symlink out
of the directory, a network kvstore or a tensorstore ``context``. We take only
the relative path string and a few validated metadata fields, reject absolute
paths, ``..`` components, anything whose real path (symlinks followed, every
file of the array directory included) lies outside the checkpoint directory,
any kvstore driver other than ``file``/``gfile``/``gcs`` (the latter two are
read from the local copy; the bucket is ignored), any ``context`` and any
array driver other than ``zarr``. The checks run before tensorstore opens the
array; a concurrent writer of the checkpoint directory is out of scope.

Limits, all checked before any array is allocated (a few KB of msgpack can
declare a 64 GiB tensor): the tree may nest at most ``MAX_NESTING_DEPTH``
levels; inline arrays must hold exactly the bytes their shape and dtype
declare; a zarr array's ``.zarray`` (when present) must agree with its spec,
every chunk file of its chunk grid must exist (tensorstore would read a
missing one as zeros) and be large enough for its chunk (exactly its size
uncompressed; deflate expands at most ``DEFLATE_MAX_RATIO`` times); and the
arrays of the part read may declare at most ``max_bytes`` bytes in all (as
stored, default ``DEFAULT_MAX_BYTES``). Sizes are Python integers, so no
declared shape overflows. Every failure is a ``CheckpointError`` naming the
file, the leaf and the problem. ``check_t5_params`` (and so every load)
refuses NaN and Inf parameters unless ``allow_nonfinite=True``.

T5X's ``target`` names are exactly our parameter names, so conversion is a
shape/dtype check plus a float32 cast. The network dimensions are inferred
from the shapes; what the tensors cannot tell (dropout rate, relative-position
max distance, layer-norm epsilon) comes from the run's gin files in T5X and is
taken from ``T5Config``'s defaults unless overridden.
"""

import itertools
import json
import math
import os
import re
from typing import Any, Mapping, Optional

import ml_dtypes
import msgpack
import numpy as np
import tensorstore as ts

from t5align.models import t5

CHECKPOINT_FILENAME = "checkpoint"
ORBAX_METADATA_FILENAME = "_METADATA"
SUPPORTED_VERSIONS = (2, 3)

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
_ALLOWED_DTYPES = {
    name: np.dtype(name) for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64")
}
_ALLOWED_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
_LOCAL_KVSTORE_DRIVERS = ("file", "gfile", "gcs")
_ZARR_COMPRESSORS = ("gzip", "zlib", "bz2", "blosc", "zstd")
_LAYER_KEY = re.compile(r"layers_(\d+)")
_ZARRAY = ".zarray"
_CHUNK_INDEX = re.compile(r"0|[1-9][0-9]*")  # as zarr writes them: no sign, no leading zeros
_MAX_ZARRAY_BYTES = 1 << 20  # a .zarray is a few hundred bytes of JSON

# T5 v1.1 XXL's 11B float32 parameters are about 45 GB; anything a lot larger
# is not a T5 checkpoint this code trains.
DEFAULT_MAX_BYTES = 64 * 2**30
# T5X trees nest about eight levels (optimizer/target/decoder/layers_0/mlp/wi_0/kernel);
# the bound keeps the decoder's recursion far from Python's limit.
MAX_NESTING_DEPTH = 64
# The best deflate can do is one 258-byte match per 2 bits of output.
DEFLATE_MAX_RATIO = 1032


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: names the file, the entry and the problem."""

  def __init__(self, path: str, name: Optional[str], problem: str):
    self.path = str(path)
    self.name = name
    self.problem = problem
    where = f"{self.path}: {name}" if name else self.path
    super().__init__(f"{where}: {problem}")


class _Ext:
  """A msgpack ext payload kept undecoded until its tree path is known."""

  def __init__(self, code: int, data: bytes):
    self.code = code
    self.data = data


def _join(path: tuple) -> str:
  return "/".join(path) if path else "<root>"


def checkpoint_file(path: str) -> str:
  """The msgpack file of a checkpoint given as a directory or as the file itself."""
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.exists(os.path.join(directory, ORBAX_METADATA_FILENAME)):
    raise CheckpointError(path, None, "T5X Orbax checkpoint (has _METADATA): not supported yet; "
                          "use a legacy T5X (msgpack + tensorstore) or a Hugging Face checkpoint")
  if os.path.isdir(path):
    path = os.path.join(path, CHECKPOINT_FILENAME)
  if not os.path.isfile(path):
    raise CheckpointError(path, None, "no legacy T5X msgpack checkpoint file here")
  return path


class _PendingRead:
  """A tensorstore leaf whose checks passed; read once the whole tree is checked."""

  def __init__(self, spec: dict, open_kwargs: dict, shape: tuple, array_dir: str, path: tuple):
    self.spec, self.open_kwargs, self.shape = spec, open_kwargs, shape
    self.array_dir, self.path = array_dir, path


class _Decoder:
  """Turns the raw msgpack tree of one checkpoint file into numpy arrays."""

  def __init__(self, file: str, version: int, max_bytes: int):
    self.file = file
    self.version = version
    self.root = os.path.realpath(os.path.dirname(os.path.abspath(file)))
    self.max_bytes = max_bytes
    self.declared = 0

  def error(self, path: tuple, problem: str) -> CheckpointError:
    return CheckpointError(self.file, _join(path), problem)

  def read(self, node: Any, path: tuple) -> Any:
    """``node`` decoded: every leaf is checked (and counted) before any zarr array is read."""
    return self._fill(self.decode(node, path))

  def _fill(self, node: Any) -> Any:
    if isinstance(node, _PendingRead):
      return self._read_tensorstore(node)
    if isinstance(node, dict):
      return {k: self._fill(v) for k, v in node.items()}
    if isinstance(node, list):
      return [self._fill(v) for v in node]
    return node

  def _reserve(self, nbytes: int, path: tuple) -> None:
    self.declared += nbytes
    if self.declared > self.max_bytes:
      raise self.error(path, f"declares {nbytes:,} bytes, which brings the arrays read to "
                       f"{self.declared:,} bytes, over max_bytes={self.max_bytes:,}; pass a "
                       "larger max_bytes if the checkpoint really is that large")

  def decode(self, node: Any, path: tuple) -> Any:
    if len(path) > MAX_NESTING_DEPTH:
      raise self.error(path[:MAX_NESTING_DEPTH], f"nested deeper than {MAX_NESTING_DEPTH} "
                       "levels; not a T5X checkpoint tree")
    if isinstance(node, _Ext):
      return self._ext(node, path)
    if isinstance(node, dict):
      if _CHUNKED in node:
        return self._unchunk(node, path)
      if "driver" in node or "kvstore" in node:
        return self._check_tensorstore(node, path)
      return {str(k): self.decode(v, path + (str(k),)) for k, v in node.items()}
    if isinstance(node, list):
      return [self.decode(v, path + (str(i),)) for i, v in enumerate(node)]
    return node

  def _reinterpret(self, array: np.ndarray) -> np.ndarray:
    # Version 2 wrote bfloat16 as its raw 16 bits under dtype uint16.
    if self.version == 2 and array.dtype == np.uint16:
      return array.view(ml_dtypes.bfloat16)
    return array

  def _dtype(self, name: Any, path: tuple) -> np.dtype:
    if isinstance(name, bytes):
      name = name.decode("ascii", errors="replace")
    if isinstance(name, str):
      if name in _ALLOWED_DTYPES:
        return _ALLOWED_DTYPES[name]
      try:  # zarr-style names such as '<f4'
        dtype = np.dtype(name)
      except (TypeError, ValueError):
        dtype = None
      if dtype is not None and dtype.name in _ALLOWED_DTYPES and dtype.byteorder in "<=|":
        return _ALLOWED_DTYPES[dtype.name]
    raise self.error(path, f"unsupported array dtype {name!r}; allowed: {sorted(_ALLOWED_DTYPES)}")

  def _shape(self, shape: Any, path: tuple, *, field: str = "shape", minimum: int = 0) -> tuple:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= minimum for d in shape):
      raise self.error(path, f"{field} must be a list of integers >= {minimum}, got {shape!r}")
    return tuple(shape)

  def _ext(self, ext: _Ext, path: tuple) -> Any:
    if ext.code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
      raise self.error(path, f"msgpack ext type {ext.code} is not allowed (only 1 = ndarray and "
                       "3 = numpy scalar)")
    try:
      fields = msgpack.unpackb(ext.data, raw=True)
    except (ValueError, msgpack.UnpackException) as e:
      raise self.error(path, f"corrupt inline array: {e}") from e
    if not isinstance(fields, (list, tuple)) or len(fields) != 3:
      raise self.error(path, "inline array must be (shape, dtype, bytes)")
    shape, dtype_name, buffer = fields
    shape = self._shape(shape, path)
    dtype = self._dtype(dtype_name, path)
    if not isinstance(buffer, bytes):
      raise self.error(path, "inline array data is not a byte string")
    expected = math.prod(shape) * dtype.itemsize
    if len(buffer) != expected:
      raise self.error(path, f"inline array holds {len(buffer)} bytes, shape {list(shape)} of "
                       f"{dtype.name} needs {expected}")
    self._reserve(expected, path)
    array = self._reinterpret(np.frombuffer(buffer, dtype=dtype).reshape(shape))
    return array[()] if ext.code == _EXT_NPSCALAR else array

  def _unchunk(self, node: dict, path: tuple) -> np.ndarray:
    def ordered(mapping, field):
      if not isinstance(mapping, dict) or set(mapping) != {str(i) for i in range(len(mapping))}:
        raise self.error(path, f"chunked array field {field!r} must map '0'..'n-1' to values")
      return [mapping[str(i)] for i in range(len(mapping))]

    shape = self._shape(ordered(node.get("shape"), "shape"), path)
    chunks = [self.decode(c, path + ("chunks", str(i)))
              for i, c in enumerate(ordered(node.get("chunks"), "chunks"))]
    if not chunks or not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
      raise self.error(path, "chunked array chunks must be 1-D arrays")
    if len({c.dtype for c in chunks}) != 1:
      raise self.error(path, "chunked array chunks have different dtypes")
    # The chunks were counted against max_bytes as they were decoded.
    size = sum(c.size for c in chunks)
    if size != math.prod(shape):
      raise self.error(path, f"chunked array has {size} elements, shape {list(shape)} needs "
                       f"{math.prod(shape)}")
    return np.concatenate(chunks).reshape(shape)

  def _array_dir(self, relative: Any, path: tuple) -> tuple[str, set]:
    """Validated real path of an array directory named by a spec's relative path, and the
    files below it ('0.0', 'sub/0', ...)."""
    if not isinstance(relative, str) or not relative.strip("/"):
      raise self.error(path, f"tensorstore path must be a non-empty relative string, got "
                       f"{relative!r}")
    if "\x00" in relative or "\\" in relative:
      raise self.error(path, f"tensorstore path {relative!r} contains a NUL or backslash")
    if relative.startswith("/") or os.path.isabs(relative):
      raise self.error(path, f"tensorstore path {relative!r} is absolute; only paths relative to "
                       "the checkpoint directory are allowed")
    parts = [p for p in relative.split("/") if p]
    if any(p in (".", "..") for p in parts):
      raise self.error(path, f"tensorstore path {relative!r} has a '.' or '..' component")
    real = os.path.realpath(os.path.join(self.root, *parts))
    self._check_inside(real, relative, path)
    if not os.path.isdir(real):
      raise self.error(path, f"array directory {relative!r} does not exist in {self.root}")
    # Every entry below the array directory must also resolve inside the
    # checkpoint (a chunk file could be a symlink to anywhere). Walk real
    # directories once each, so symlink cycles terminate.
    seen, stack, files = set(), [(real, "")], set()
    while stack:
      directory, prefix = stack.pop()
      if directory in seen:
        continue
      seen.add(directory)
      for entry in os.listdir(directory):
        target = os.path.realpath(os.path.join(directory, entry))
        self._check_inside(target, f"{relative.rstrip('/')}/{prefix}{entry}", path)
        if os.path.isdir(target):
          stack.append((target, f"{prefix}{entry}/"))
        else:
          files.add(prefix + entry)
    return real, files

  def _check_inside(self, real: str, shown: str, path: tuple):
    if os.path.commonpath([real, self.root]) != self.root or real == self.root:
      raise self.error(path, f"tensorstore path {shown!r} resolves to {real}, outside the "
                       f"checkpoint directory {self.root}")

  def _check_tensorstore(self, spec: dict, path: tuple) -> _PendingRead:
    """Validates a tensorstore spec leaf and the files it names, reading no array data."""
    if "context" in spec:
      raise self.error(path, "tensorstore spec carries a 'context'; not allowed")
    if spec.get("driver") != "zarr":
      raise self.error(path, f"tensorstore array driver {spec.get('driver')!r} is not allowed "
                       "(only 'zarr')")
    kvstore = spec.get("kvstore", {})
    if not isinstance(kvstore, dict):
      raise self.error(path, f"tensorstore kvstore must be a dict with a driver, got {kvstore!r}")
    if "context" in kvstore:
      raise self.error(path, "tensorstore kvstore carries a 'context'; not allowed")
    driver = kvstore.get("driver", "file")
    if driver not in _LOCAL_KVSTORE_DRIVERS:
      raise self.error(path, f"tensorstore kvstore driver {driver!r} is not allowed (only "
                       f"{', '.join(_LOCAL_KVSTORE_DRIVERS)}, all read from the local directory)")
    if "path" in kvstore and "path" in spec:
      raise self.error(path, "tensorstore spec has both kvstore.path and a top-level path")
    # tensorstore >= 0.1.14 keeps the path in the kvstore, older specs at top level.
    relative = kvstore["path"] if "path" in kvstore else spec.get("path")
    array_dir, files = self._array_dir(relative, path)
    relative = relative.strip("/")

    metadata = spec.get("metadata")
    if not isinstance(metadata, dict):
      raise self.error(path, "tensorstore spec has no 'metadata' dict")
    shape = self._shape(metadata.get("shape"), path, field="metadata.shape")
    dtype = self._dtype(spec.get("dtype", metadata.get("dtype")), path)
    self._reserve(math.prod(shape) * dtype.itemsize, path)
    zarr_dtype = "bfloat16" if dtype.name == "bfloat16" else dtype.str
    kvstore_spec = {"driver": "file", "path": array_dir + "/"}
    if _ZARRAY in files:
      # The stored metadata is what tensorstore reads; it must agree with the spec.
      stored = self._stored_metadata(array_dir, relative, path)
      where = f"{relative}/{_ZARRAY}"
      stored_shape = self._shape(stored.get("shape"), path, field=f"{where} shape")
      if stored_shape != shape:
        raise self.error(path, f"{where} declares shape {list(stored_shape)}, the spec "
                         f"{list(shape)}")
      if self._dtype(stored.get("dtype"), path) != dtype:
        raise self.error(path, f"{where} declares dtype {stored.get('dtype')!r}, the spec "
                         f"{dtype.name}")
      if "chunks" not in stored:
        raise self.error(path, f"{where} has no chunks")
      checked = self._zarr_metadata(stored, shape, zarr_dtype, path, where=where)
      built = {"driver": "zarr", "kvstore": kvstore_spec,
               "metadata": {"shape": list(shape), "dtype": zarr_dtype}}
      open_kwargs = {}
    else:
      # T5X specs carry the full metadata; some copies drop the .zarray files.
      checked = self._zarr_metadata(metadata, shape, zarr_dtype, path, where="metadata")
      built = {"driver": "zarr", "kvstore": kvstore_spec, "metadata": checked}
      open_kwargs = {"assume_metadata": True}
    self._check_chunk_files(array_dir, relative, files, shape, dtype, checked, path)
    return _PendingRead(built, open_kwargs, shape, array_dir, path)

  def _stored_metadata(self, array_dir: str, relative: str, path: tuple) -> dict:
    file = os.path.join(array_dir, _ZARRAY)
    if os.path.getsize(file) > _MAX_ZARRAY_BYTES:
      raise self.error(path, f"{relative}/{_ZARRAY} is over {_MAX_ZARRAY_BYTES} bytes")
    try:
      with open(file, "rb") as f:
        stored = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:
      raise self.error(path, f"{relative}/{_ZARRAY} is not readable zarr metadata: {e}") from e
    if not isinstance(stored, dict) or stored.get("zarr_format") != 2:
      raise self.error(path, f"{relative}/{_ZARRAY} is not a zarr v2 metadata object")
    return stored

  def _check_chunk_files(self, array_dir: str, relative: str, files: set, shape: tuple,
                         dtype: np.dtype, metadata: dict, path: tuple) -> None:
    """Every chunk of the grid has a file that can hold it.

    tensorstore reads a missing chunk as the fill value (zeros for T5X's null
    fill value), and allocates a chunk before it finds a file too short for it.
    """
    chunks, separator = metadata["chunks"], metadata["dimension_separator"]
    grid = [-(-size // chunk) for size, chunk in zip(shape, chunks)]  # [chunks per dimension]

    def key(index: tuple) -> str:
      return separator.join(map(str, index)) if index else "0"  # zarr v2 names a 0-d chunk "0"

    def in_grid(name: str) -> bool:
      if not grid:
        return name == "0"
      parts = name.split(separator)
      return len(parts) == len(grid) and all(
          _CHUNK_INDEX.fullmatch(p) and int(p) < n for p, n in zip(parts, grid))

    present = {name for name in files if in_grid(name)}
    expected = math.prod(grid)
    if len(present) < expected:
      # Among the first len(present) + 1 keys at least one is absent, so this stops early
      # even for a grid of 2**40 chunks.
      missing = next(key(index) for index in itertools.product(*map(range, grid))
                     if key(index) not in present)
      raise self.error(path, f"zarr chunk file {relative}/{missing} is missing ({len(present)} "
                       f"of {expected:,} chunk files present); it would read as zeros")
    chunk_bytes = math.prod(chunks) * dtype.itemsize
    compressor = metadata["compressor"]
    for name in sorted(present):
      size = os.path.getsize(os.path.join(array_dir, name))
      if compressor is None and size != chunk_bytes:
        raise self.error(path, f"zarr chunk file {relative}/{name} holds {size} bytes; an "
                         f"uncompressed chunk {list(chunks)} of {dtype.name} is {chunk_bytes}")
      if (compressor is not None and compressor["id"] in ("gzip", "zlib")
          and chunk_bytes > DEFLATE_MAX_RATIO * size):
        raise self.error(path, f"zarr chunk file {relative}/{name} holds {size} compressed "
                         f"bytes, too few for a chunk {list(chunks)} of {dtype.name} "
                         f"({chunk_bytes:,} bytes; {compressor['id']} expands at most "
                         f"{DEFLATE_MAX_RATIO}x)")

  def _read_tensorstore(self, leaf: _PendingRead) -> np.ndarray:
    try:
      store = ts.open(leaf.spec, read=True, open=True, context=ts.Context(),
                      **leaf.open_kwargs).result()
      array = np.asarray(store.read().result())
    except ValueError as e:  # tensorstore reports all its failures as ValueError
      raise self.error(leaf.path, f"tensorstore could not read {leaf.array_dir}: {e}") from e
    if array.shape != leaf.shape:
      raise self.error(leaf.path, f"array shape {list(array.shape)} does not match its spec "
                       f"{list(leaf.shape)}")
    return self._reinterpret(array)

  def _zarr_metadata(self, metadata: dict, shape: tuple, zarr_dtype: str, path: tuple, *,
                     where: str) -> dict:
    """Full zarr v2 metadata from ``metadata`` (a spec's or a .zarray), validated."""
    chunks = metadata.get("chunks", list(shape))
    chunks = self._shape(chunks, path, field=f"{where} chunks", minimum=1)
    if len(chunks) != len(shape):
      raise self.error(path, f"{where} chunks {list(chunks)} and shape {list(shape)} differ in "
                       "rank")
    compressor = metadata.get("compressor")
    if compressor is not None:
      if (not isinstance(compressor, dict) or compressor.get("id") not in _ZARR_COMPRESSORS
          or not all(isinstance(v, (int, str)) for v in compressor.values())):
        raise self.error(path, f"unsupported zarr compressor {compressor!r} in {where}")
    if metadata.get("filters") is not None:
      raise self.error(path, f"zarr filters are not supported ({where})")
    order = metadata.get("order", "C")
    separator = metadata.get("dimension_separator", ".")
    if order not in ("C", "F") or separator not in (".", "/"):
      raise self.error(path, f"unsupported zarr order {order!r} or dimension_separator "
                       f"{separator!r} in {where}")
    return {"zarr_format": 2, "shape": list(shape), "chunks": list(chunks), "dtype": zarr_dtype,
            "compressor": compressor, "filters": None, "order": order, "fill_value": None,
            "dimension_separator": separator}


def _load_raw(path: str, max_bytes: int) -> tuple[str, dict]:
  file = checkpoint_file(path)
  size = os.path.getsize(file)
  if size > max_bytes:
    raise CheckpointError(file, None, f"file of {size:,} bytes is over max_bytes={max_bytes:,}")
  with open(file, "rb") as f:
    data = f.read()
  if data.startswith(b"model_checkpoint_path"):
    raise CheckpointError(file, None, "this is a TensorFlow checkpoint index, not a T5X msgpack "
                          "checkpoint")
  try:
    contents = msgpack.unpackb(data, raw=False, strict_map_key=False,
                               ext_hook=lambda code, payload: _Ext(code, payload))
  except (ValueError, msgpack.UnpackException) as e:
    raise CheckpointError(file, None, f"not a msgpack T5X checkpoint: {e}") from e
  if not isinstance(contents, dict):
    raise CheckpointError(file, None, "checkpoint does not decode to a dict")
  version = contents.get("version")
  if not isinstance(version, int) or isinstance(version, bool):
    raise CheckpointError(file, "version", "missing; plain flax checkpoints (version 0) and T5X "
                          "checkpoints before version 2 are not supported")
  if version not in SUPPORTED_VERSIONS:
    raise CheckpointError(file, "version", f"T5X checkpoint version {version} is not supported "
                          f"(supported: {SUPPORTED_VERSIONS})")
  return file, contents


def read_t5x_tree(path: str, subtree: tuple = ("optimizer", "target"), *,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
  """Decoded contents of a legacy T5X checkpoint below ``subtree``.

  Args:
    path: a ``checkpoint_<step>`` directory or its msgpack file (single-file
      checkpoints such as T5X's test data are files named otherwise).
    subtree: keys leading to the part to read; ``()`` reads everything,
      including optimizer slots.
    max_bytes: the most bytes the arrays below ``subtree`` may declare in all
      (as stored, before any cast), checked before any is read; the msgpack
      file may not be larger either.

  Returns:
    Nested dicts with numpy arrays (read-only when inlined) and Python scalars.

  Raises:
    CheckpointError: naming the file and the leaf, for any of the problems
      listed in the module docstring.
  """
  file, contents = _load_raw(path, max_bytes)
  node = contents
  for depth, key in enumerate(subtree):
    if not isinstance(node, dict) or key not in node:
      raise CheckpointError(file, _join(subtree[:depth + 1]), "not in the checkpoint")
    node = node[key]
  return _Decoder(file, contents["version"], max_bytes).read(node, tuple(subtree))


def t5x_checkpoint_step(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Optional[int]:
  """The training step stored in ``optimizer/state/step`` (None if absent)."""
  file, contents = _load_raw(path, max_bytes)
  optimizer = contents.get("optimizer")
  state = optimizer.get("state") if isinstance(optimizer, dict) else None
  if not isinstance(state, dict) or "step" not in state:
    return None
  step = _Decoder(file, contents["version"], max_bytes).read(state["step"],
                                                             ("optimizer", "state", "step"))
  return int(np.asarray(step))


def flatten_params(tree: Mapping, prefix: tuple = ()) -> dict:
  """``{'a': {'b': x}} -> {'a/b': x}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, prefix + (str(key),)))
    else:
      flat["/".join(prefix + (str(key),))] = value
  return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """Inverse of ``flatten_params``."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _layer_count(params: Mapping, stack: str, source: str) -> int:
  indices = sorted(int(m.group(1)) for key in params.get(stack, {})
                   if (m := _LAYER_KEY.fullmatch(key)))
  if indices != list(range(len(indices))) or not indices:
    raise CheckpointError(source, stack, f"layers must be layers_0..layers_<n-1>, found indices "
                          f"{indices}")
  return len(indices)


def infer_t5_config(params: Mapping, *, source: str, **overrides) -> t5.T5Config:
  """``T5Config`` whose dimensions match a T5X-named parameter tree.

  ``overrides`` set what shapes cannot tell (``dtype``, ``dropout_rate``,
  ``relative_attention_max_distance``, ``layer_norm_epsilon``); giving a
  dimension that disagrees with the tensors fails later in
  ``check_t5_params``.
  """
  flat = flatten_params(params)

  def shape(name: str, rank: int) -> tuple:
    if name not in flat:
      hint = ""
      if name.endswith("mlp/wi_0/kernel") and name.replace("wi_0", "wi") in flat:
        hint = " (the checkpoint has mlp/wi: a T5 1.0 ReLU network, which is not supported)"
      raise CheckpointError(source, name, f"missing; cannot infer the T5 v1.1 dimensions{hint}")
    dims = tuple(np.shape(flat[name]))
    if len(dims) != rank:
      raise CheckpointError(source, name, f"expected a rank-{rank} array, got shape {list(dims)}")
    return dims

  vocab_size, emb_dim = shape("token_embedder/embedding", 2)
  num_heads, num_buckets = shape("encoder/relpos_bias/rel_embedding", 2)
  inner = shape("encoder/layers_0/attention/query/kernel", 2)[1]
  if inner % num_heads:
    raise CheckpointError(source, "encoder/layers_0/attention/query/kernel",
                          f"{inner} query columns do not split into {num_heads} heads "
                          "(heads come from encoder/relpos_bias/rel_embedding)")
  fields = dict(
      vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads, head_dim=inner // num_heads,
      mlp_dim=shape("encoder/layers_0/mlp/wi_0/kernel", 2)[1],
      num_encoder_layers=_layer_count(params, "encoder", source),
      num_decoder_layers=_layer_count(params, "decoder", source),
      relative_attention_num_buckets=num_buckets)
  fields.update(overrides)
  return t5.T5Config(**fields)


def check_finite(array: np.ndarray, *, source: str, name: str) -> None:
  """Raises ``CheckpointError`` if floating-point ``array`` holds a NaN or an Inf."""
  finite = np.isfinite(array)
  if not finite.all():
    first = np.unravel_index(np.argmin(finite), array.shape)
    raise CheckpointError(source, name, f"{array.size - np.count_nonzero(finite)} non-finite "
                          f"value(s), the first {array[first]} at index {[int(i) for i in first]}; "
                          "a damaged or diverged checkpoint (pass allow_nonfinite=True to load "
                          "it anyway)")


def check_t5_params(params: Mapping, config: t5.T5Config, *, source: str,
                    allow_nonfinite: bool = False) -> dict:
  """Validates names and shapes against ``config``; returns float32 numpy params.

  Raises ``CheckpointError`` naming ``source`` and the first offending
  parameter (missing and unexpected names are listed together). NaN and Inf
  values, also those made by the float32 cast of a larger float64, are
  refused unless ``allow_nonfinite``.
  """
  expected = flatten_params(t5.abstract_params(config))
  got = flatten_params(params)
  missing = sorted(expected.keys() - got.keys())
  unexpected = sorted(got.keys() - expected.keys())
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}"
                      + (" ..." if len(missing) > 8 else ""))
    if unexpected:
      problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                      + (" ..." if len(unexpected) > 8 else ""))
    if "decoder/logits_dense/kernel" in missing:
      problems.append("no decoder/logits_dense/kernel: logits via the shared embedding (T5 1.0) "
                      "are not supported")
    raise CheckpointError(source, None, "parameter names do not match a T5 v1.1 network of "
                          f"{config}: " + "; ".join(problems))
  out = {}
  for name, want in expected.items():
    value = got[name]
    if tuple(np.shape(value)) != tuple(want.shape):
      raise CheckpointError(source, name, f"shape {list(np.shape(value))} does not match "
                            f"{list(want.shape)} expected for {config}")
    dtype = np.asarray(value).dtype
    if not (np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16):
      raise CheckpointError(source, name, f"dtype {dtype} is not a floating-point type")
    with np.errstate(over="ignore"):  # a float64 beyond float32 range becomes inf: checked next
      out[name] = np.asarray(value, dtype=np.float32)
    if not allow_nonfinite:
      check_finite(out[name], source=source, name=name)
  return unflatten_params(out)


def load_t5x_checkpoint(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                        allow_nonfinite: bool = False,
                        **config_overrides) -> tuple[t5.T5Config, dict]:
  """``(T5Config, params)`` from a legacy T5X checkpoint's ``optimizer/target``.

  Params are float32 numpy arrays in a plain nested dict with our (= T5X)
  names; place them on devices with ``jax.device_put``. ``config_overrides``
  (e.g. ``dtype='float32'``, ``dropout_rate=0.1``) are passed to
  ``infer_t5_config``. ``max_bytes`` bounds the arrays as stored (see
  ``read_t5x_tree``; the float32 copy comes on top); NaN or Inf parameters
  are refused unless ``allow_nonfinite``. Raises ``CheckpointError``.
  """
  file = checkpoint_file(path)
  params = read_t5x_tree(file, max_bytes=max_bytes)
  if not isinstance(params, dict):
    raise CheckpointError(file, "optimizer/target", "is not a parameter tree")
  config = infer_t5_config(params, source=file, **config_overrides)
  return config, check_t5_params(params, config, source=file, allow_nonfinite=allow_nonfinite)
