"""Device mesh, logical-axis rule sets and shardings (T5X's partitioning, on jax.jit).

Every parameter and the main activations of ``t5align.models.t5`` carry T5X
logical axis names (``batch``, ``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``,
``joined_kv``, ``length``, ``relpos_buckets``). A *rule set* is plain data, a
tuple of ``(logical_name, mesh_axes)`` pairs, that maps those names onto a 2-D
``('data', 'model')`` mesh. Steps are ordinary ``jax.jit`` functions with
``NamedSharding`` in/out shardings (``jit_sharded``); there is no wrapper class.

Resolution (T5X's, implemented by ``flax.linen.logical_to_mesh_axes``): for
one array, walk the rules in order; a rule ``(name, axes)`` applies to the
dimension called ``name`` if that dimension has no assignment yet and none of
``axes`` is already used by another dimension of the same array; dimensions
that no rule claims are replicated. Example with the ``tensor_parallel`` rules
``vocab -> model`` (earlier) and ``mlp -> model`` (later): an array with axes
``('mlp', 'vocab')`` becomes ``P(None, 'model')``, because the vocab rule
claims 'model' first and the mlp dimension then finds it taken.

Named rule sets (``RULE_SETS``):

================  ===========  =================================  =====================
name              T5X column   parameters                         activations
================  ===========  =================================  =====================
data_parallel     (ours)       replicated                         batch on data
fsdp              (1, 2)       embed on data, the rest on model   batch on data,
                                                                  heads/mlp on model
tensor_parallel   (1, 1)       vocab/mlp/heads/joined_kv on       batch on data,
                               model, embed replicated            heads/mlp on model
2d                (2, 2)       embed on data, the rest on model   as tensor_parallel,
                                                                  + embed on model
================  ===========  =================================  =====================

With ``model=1`` the fsdp rules are pure FSDP (ZeRO-3): 'model' has one device.

Multi-process runs call ``initialize_distributed`` first, build one global mesh
with ``make_mesh``, read the block of rows ``process_data_shard`` names and
turn it into global arrays with ``shard_batch``; see docs/sharding.md.

``Placement`` bundles a mesh and a rule set with the three moves every stage
makes, training or inference alike: parameters onto their shards, global row
batches onto 'data', and results back to host numpy on every process.
"""

import functools
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import contextlib
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from t5align.models import t5

MESH_AXES = ("data", "model")
MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical names that no T5X rule set shards.
_ALWAYS_REPLICATED = ("relpos_buckets", "abspos_buckets", "length", "layers", "stack",
                      "mlp_activations")
# T5X's rules for 'embed' per (activation_partitioning_dims,
# parameter_partitioning_dims). One list serves parameters and activations
# because resolution is per array: activations hold 'batch' on 'data', so an
# ('embed', 'data') rule only reaches parameters, while ('embed', 'model')
# reaches activations and 1-D scales (a kernel's other dimension has already
# taken 'model').
_EMBED_RULES = {
    (1, 1): (("embed", None),),
    (2, 1): (("embed", "model"),),
    (1, 2): (("embed", "data"),),
    (2, 2): (("embed", "model"), ("embed", "data")),
}


def _is_mesh_axes(axes: Any) -> bool:
  return (axes is None or isinstance(axes, str)
          or (isinstance(axes, tuple) and all(isinstance(a, str) for a in axes)))


def as_rules(rules: Union[str, Sequence[tuple[str, MeshAxes]]]) -> Rules:
  """A rule-set name or rule sequence -> a validated tuple of rules."""
  if isinstance(rules, str):
    return get_rules(rules)
  checked = []
  for i, rule in enumerate(rules):
    if isinstance(rule, (tuple, list)) and len(rule) == 2:
      name, axes = rule
      # Config files may spell a tuple of mesh axes as a list.
      axes = tuple(axes) if isinstance(axes, list) else axes
      if isinstance(name, str) and _is_mesh_axes(axes):
        checked.append((name, axes))
        continue
    raise ValueError(
        f"Partitioning rule {i} is {rule!r}; expected (logical_name, mesh_axes) with "
        "mesh_axes None, a mesh axis name or a tuple of mesh axis names")
  return tuple(checked)


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Sequence[tuple[str, MeshAxes]] = ()) -> Rules:
  """T5X's default rule table (``t5x.partitioning.standard_logical_axis_rules``).

  ``(1, 1)`` is 1-D model parallelism (Megatron-style: vocab, mlp, heads and
  joined_kv on 'model'); ``parameter_partitioning_dims=2`` also shards kernel
  'embed' dimensions over 'data' (FSDP / ZeRO-3); ``activation_partitioning_dims=2``
  also shards activation 'embed' dimensions over 'model'. ``additional_rules``
  are appended, so they only reach names the table leaves unassigned.
  """
  key = (activation_partitioning_dims, parameter_partitioning_dims)
  if key not in _EMBED_RULES:
    raise ValueError(
        "standard_logical_axis_rules supports activation_partitioning_dims and "
        f"parameter_partitioning_dims in {{1, 2}}, got {key}")
  rules = (("batch", "data"),
           ("vocab", "model"),
           ("mlp", "model"),
           ("heads", "model"),
           ("kv", None),
           ("joined_kv", "model"))
  rules += _EMBED_RULES[key]
  rules += tuple((name, None) for name in _ALWAYS_REPLICATED)
  return rules + as_rules(tuple(additional_rules))


def data_parallel_rules() -> Rules:
  """Batch over 'data'; every parameter and every other activation axis replicated."""
  replicated = ("vocab", "embed", "mlp", "heads", "kv", "joined_kv") + _ALWAYS_REPLICATED
  return (("batch", "data"),) + tuple((name, None) for name in replicated)


RULE_SETS: Mapping[str, Rules] = {
    "data_parallel": data_parallel_rules(),
    "fsdp": standard_logical_axis_rules(1, 2),
    "tensor_parallel": standard_logical_axis_rules(1, 1),
    "2d": standard_logical_axis_rules(2, 2),
}


def get_rules(name: str) -> Rules:
  """The rule set called ``name`` (a key of ``RULE_SETS``)."""
  if name not in RULE_SETS:
    raise ValueError(f"Unknown partitioning rule set {name!r}; "
                     f"choose one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def make_mesh(*, data: int = -1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``('data', 'model')`` mesh of ``data x model`` devices.

  One of ``data`` / ``model`` may be -1: it takes all devices the other leaves.
  A single process may ask for fewer devices than it has (the first ones are
  used); a multi-process mesh must use every device so that each process holds
  part of it. ``devices`` defaults to ``jax.devices()`` (all processes).
  """
  devices = list(jax.devices() if devices is None else devices)
  available = len(devices)
  asked = f"data={data}, model={model}"
  for name, size in (("data", data), ("model", model)):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
        size < 1 and size != -1):
      raise ValueError(f"Mesh axis {name!r} must be a positive integer or -1 (all remaining "
                       f"devices), got {size!r} (asked for {asked})")
  if data == -1 and model == -1:
    raise ValueError(f"At most one mesh axis may be -1 (asked for {asked}, "
                     f"{available} devices exist)")
  if data == -1 or model == -1:
    fixed_name, fixed = ("model", model) if data == -1 else ("data", data)
    if available % fixed:
      raise ValueError(f"Asked for a mesh with {asked}, but {fixed_name}={fixed} does not "
                       f"divide the {available} available devices")
    data, model = (available // fixed, model) if data == -1 else (data, available // fixed)
  if data * model > available:
    raise ValueError(f"Asked for a mesh with {asked} ({data * model} devices), but only "
                     f"{available} {devices[0].platform} devices exist")
  if data * model < available and jax.process_count() > 1:
    raise ValueError(f"Asked for a mesh with {asked} ({data * model} devices), but a "
                     f"multi-process run ({jax.process_count()} processes) must use all "
                     f"{available} devices")
  # jax.make_mesh now defaults to Explicit axes (shardings in the types).
  # T5X-style logical constraints are hints for the GSPMD partitioner, which
  # is the Auto mode.
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * model])


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           auto_detect: bool = False) -> bool:
  """Joins a multi-process JAX run; returns whether this is one.

  Must run before anything else touches JAX (listing devices or creating an
  array starts the backend, after which it is too late). It is a no-op, and
  returns False, for a single process: nothing given, no
  ``JAX_COORDINATOR_ADDRESS`` in the environment, or ``num_processes=1``.
  Otherwise every process calls it with the same coordinator address (host
  and free port of process 0) and process count, and its own id::

    initialize_distributed('10.0.0.1:8476', num_processes=2, process_id=0)  # host 0
    initialize_distributed('10.0.0.1:8476', num_processes=2, process_id=1)  # host 1

  On Cloud TPU pods, Slurm and Open MPI, JAX detects all three values; pass
  ``auto_detect=True`` there instead. CPU processes exchange collectives
  through gloo.
  """
  if jax.distributed.is_initialized():
    return True
  if coordinator_address is None:
    coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  configured = auto_detect or any(
      v is not None for v in (coordinator_address, num_processes, process_id))
  if not configured or num_processes == 1:
    return False
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be positive, got {num_processes}")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}) for num_processes="
                     f"{num_processes}, got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_divisible(path, leaf, names: PartitionSpec, sharding: NamedSharding) -> None:
  mesh = sharding.mesh
  for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[a] for a in axes)
    if size % ways:
      raise ValueError(
          f"{_path_name(path)} (shape {tuple(leaf.shape)}, logical axes {tuple(names)}): "
          f"dimension {dim} ({names[dim]!r}, size {size}) would be split over mesh axes "
          f"{axes} = {ways} devices, which does not divide it. Pick a mesh whose "
          f"{'/'.join(axes)} size divides {size}, or a rule set that does not shard "
          f"{names[dim]!r} (mesh {dict(mesh.shape)}).")


def tree_shardings(logical_axes: Any, mesh: Mesh, rules, *, shapes: Any = None) -> Any:
  """``NamedSharding`` tree for a tree of logical ``PartitionSpec`` s.

  With ``shapes`` (a matching tree of arrays or ``ShapeDtypeStruct`` s), checks
  that every sharded dimension divides evenly and names the offending leaf.
  """
  shardings = nn.logical_to_mesh_sharding(logical_axes, mesh, as_rules(rules))
  if shapes is not None:
    jax.tree_util.tree_map_with_path(_check_divisible, shapes, logical_axes, shardings)
  return shardings


def param_shardings(config: t5.T5Config, mesh: Mesh, rules) -> Any:
  """``NamedSharding`` per T5 parameter (same tree as ``t5.init_params``)."""
  return tree_shardings(t5.param_axes(config), mesh, rules, shapes=t5.abstract_params(config))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy on every device (scalars, RNG keys)."""
  return NamedSharding(mesh, PartitionSpec())


def jit_sharded(fn: Callable, *, mesh: Mesh, rules, in_shardings: Any, out_shardings: Any,
                donate_argnums: Sequence[int] = (),
                static_argnums: Sequence[int] = ()) -> Callable:
  """``jax.jit(fn, ...)`` that traces and runs under ``mesh`` and ``rules``.

  ``nn.with_logical_constraint`` inside ``fn`` only constrains activations when
  logical axis rules and a mesh are in context at trace time; the returned
  function installs both around every call (call it from Python, not from
  inside another jit). ``rules`` is a rule-set name or rule tuple.
  """
  rules = as_rules(rules)

  # jit's trace cache is keyed on the function, not on flax's rules context: a
  # fresh function per call keeps two rule sets from sharing one trace.
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    return fn(*args, **kwargs)

  jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))

  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(*args, **kwargs)
  return call


def sharded_init(config: t5.T5Config, rng: jax.Array, mesh: Mesh, rules) -> dict:
  """``t5.init_params(config, rng)`` with each parameter created in its shards.

  No device ever holds an unsharded copy, so models larger than one device's
  memory can be initialised. Values equal ``t5.init_params`` (JAX's
  partitionable threefry makes random bits independent of the sharding).
  """
  init = jit_sharded(lambda: t5.init_params(config, rng), mesh=mesh, rules=rules,
                     in_shardings=(), out_shardings=param_shardings(config, mesh, rules))
  return init()


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over 'data', other dimensions replicated: ``P('data', None)`` for [batch, length]."""
  if ndim < 1:
    raise ValueError(f"Batch arrays need a leading batch dimension, got ndim={ndim}")
  return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def validate_batch_size(batch_size: int, mesh: Mesh, *, what: str = "batch_size") -> None:
  """Raises if ``batch_size`` cannot be split evenly over the mesh's 'data' axis."""
  ways = mesh.shape["data"]
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 1):
    raise ValueError(f"{what} must be a positive integer, got {batch_size!r}")
  if batch_size % ways:
    lower, upper = (batch_size // ways) * ways, (batch_size // ways + 1) * ways
    suggestions = " or ".join(str(b) for b in (lower, upper) if b > 0)
    raise ValueError(
        f"{what}={batch_size} is not divisible by the mesh 'data' axis size {ways} "
        f"(mesh {dict(mesh.shape)}, {mesh.size} devices): every data shard must get the same "
        f"number of rows. Use {what}={suggestions}, or a 'data' axis size (MESH_DATA) "
        f"that divides {batch_size}.")


def process_data_shard(mesh: Mesh) -> tuple[int, int]:
  """Which block of every global batch this process feeds: ``(index, num_blocks)``.

  The global batch is cut into ``num_blocks`` equal blocks of consecutive rows
  and this process passes block ``index`` to ``shard_batch``; give these to the
  input pipeline (e.g. ``seqio.ShardInfo(index, num_shards)``). Processes whose
  devices hold the same 'data' indices (a 'model' axis that spans processes)
  get the same index and must feed identical rows. One process: ``(0, 1)``.
  """
  data_axis = mesh.axis_names.index("data")
  me = jax.process_index()
  held = sorted({idx[data_axis] for idx, d in np.ndenumerate(mesh.devices)
                 if d.process_index == me})
  if not held:
    raise ValueError(f"Process {me} has no device in the mesh {dict(mesh.shape)}")
  count = len(held)
  if held != list(range(held[0], held[0] + count)) or held[0] % count:
    raise ValueError(
        f"Process {me} holds the 'data' indices {held} of mesh {dict(mesh.shape)}, which are "
        "not one aligned block of consecutive rows; build the mesh with make_mesh, whose "
        "device order keeps each process's devices together")
  return held[0] // count, mesh.shape["data"] // count


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy rows -> global ``jax.Array`` s sharded ``P('data', None, ...)``.

  Single process: ``batch`` is the whole global batch. Multi-process: each
  process passes only its block of rows (see ``process_data_shard``), and the
  result is the global batch every jitted step sees.
  """
  _, num_blocks = process_data_shard(mesh)
  shards_per_block = mesh.shape["data"] // num_blocks
  first_key, first_rows = None, None
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch entry needs a leading "
                       "batch dimension")
    rows = value.shape[0]
    if first_key is None:
      first_key, first_rows = key, rows
      if jax.process_count() == 1:
        validate_batch_size(rows, mesh, what=f"batch size (rows of batch[{key!r}])")
      elif rows % shards_per_block:
        raise ValueError(
            f"batch[{key!r}] has {rows} rows on process {jax.process_index()}, which feeds "
            f"{shards_per_block} of the {mesh.shape['data']} 'data' shards (mesh "
            f"{dict(mesh.shape)}, {jax.process_count()} processes): per-process rows must "
            f"be a multiple of {shards_per_block}, i.e. the global batch a multiple of "
            f"{mesh.shape['data']}")
    elif rows != first_rows:
      raise ValueError(f"batch[{key!r}] has {rows} rows but batch[{first_key!r}] has "
                       f"{first_rows}; all entries of a batch must have the same number of rows")
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
  return out


class Placement:
  """A mesh and a rule set, and how a stage's arrays move onto and off them.

  Every stage, training or inference (relabelling, sampling, evaluation),
  places its models with ``params`` (each device receives only its shards,
  so a model larger than one device runs under ``fsdp`` / ``2d`` rules), feeds
  fixed-size global row batches with ``rows`` (rows over 'data'), calls its
  jitted functions inside ``context()`` (so activation constraints resolve
  against the rules) and reads results with ``fetch``. One process or many:
  every process passes the same global batch and gets the same numpy results.
  """

  def __init__(self, mesh: Mesh, rules):
    self.mesh = mesh
    self.rules = as_rules(rules)
    self._param_shardings = {}

  @classmethod
  def create(cls, *, rules="data_parallel", data: int = -1, model: int = 1) -> "Placement":
    """A placement on ``make_mesh(data=data, model=model)`` with the named rule set."""
    return cls(make_mesh(data=data, model=model), rules)

  @classmethod
  def single_device(cls) -> "Placement":
    """The first device alone (a 1 x 1 mesh): nothing is sharded."""
    return cls.create(rules="data_parallel", data=1, model=1)

  def check_batch_size(self, batch_size: int, *, what: str = "batch_size") -> None:
    validate_batch_size(batch_size, self.mesh, what=what)

  def param_shardings(self, config: t5.T5Config) -> Any:
    if config not in self._param_shardings:
      self._param_shardings[config] = param_shardings(config, self.mesh, self.rules)
    return self._param_shardings[config]

  def params(self, params: Any, config: t5.T5Config) -> Any:
    """``params`` of ``config`` as float32 arrays in their shards.

    Host (numpy) values go straight to the devices that hold each shard; no
    device ever receives a whole parameter it does not keep.
    """
    def put(x, sharding):
      if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x.astype(np.float32), sharding)  # already on devices: reshard
      return jax.device_put(np.asarray(x, np.float32), sharding)
    return jax.tree.map(put, params, self.param_shardings(config))

  def rows(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A global batch (the same numpy rows on every process) as arrays sharded over 'data'.

    Each process hands ``shard_batch`` its own block of rows
    (``process_data_shard``); the number of rows must divide over 'data'.
    """
    block, num_blocks = self._data_shard
    if num_blocks > 1:
      rows = len(next(iter(batch.values()))) // num_blocks
      batch = {k: np.asarray(v)[block * rows:(block + 1) * rows] for k, v in batch.items()}
    return shard_batch(batch, self.mesh)

  @functools.cached_property
  def _data_shard(self) -> tuple[int, int]:
    return process_data_shard(self.mesh)  # fixed for the mesh; not redone for every batch

  @contextlib.contextmanager
  def context(self):
    """The mesh and rules, around calls of jitted functions (not needed for ``jit_sharded``)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def fetch(self, tree: Any) -> Any:
    """Results as host numpy arrays, whole, on every process."""
    def get(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x)
    return jax.tree.map(get, tree)

  def map_batches(self, fn: Callable[..., Any], arrays: Sequence[np.ndarray],
                  batch_size: int) -> tuple[np.ndarray, ...]:
    """Applies ``fn(batch_index, *rows)`` to fixed-size row batches; concatenates the outputs.

    The rows of batch ``b`` are ``arrays[i][b * batch_size:(b + 1) * batch_size]``,
    placed with ``rows``; ``fn`` runs inside ``context()`` and returns an array
    or a tuple of arrays with ``batch_size`` rows, fetched with ``fetch``. The
    last batch is filled up by repeating its final row, so every call has one
    shape (one compilation), and the filler outputs are dropped.
    """
    self.check_batch_size(batch_size)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
      raise ValueError(f"map_batches: arrays have different row counts {[len(a) for a in arrays]}")
    parts = []
    for b, start in enumerate(range(0, n, batch_size)):
      index = np.minimum(np.arange(start, start + batch_size), n - 1)
      placed = self.rows({str(i): np.asarray(a)[index] for i, a in enumerate(arrays)})
      with self.context():
        out = fn(b, *(placed[str(i)] for i in range(len(arrays))))
      out = self.fetch(out if isinstance(out, tuple) else (out,))
      parts.append([o[:min(batch_size, n - start)] for o in out])
    return tuple(np.concatenate(column) for column in zip(*parts))
