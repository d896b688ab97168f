"""Tests of t5align.partitioning on the 8 fake CPU devices of tests/conftest.py.

Expected partition specs are derived by hand from T5X's rule table and its
resolution order; sharded numerics are compared with the same computation on
one device. The multi-process test starts two CPU processes (4 devices each)
joined through jax.distributed and gloo.
"""

import dataclasses
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from t5align import partitioning
from t5align.models import t5

CFG = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
MESH_SHAPES = {"2x4": (2, 4), "8x1": (8, 1)}
RULE_NAMES = ("data_parallel", "fsdp", "tensor_parallel", "2d")


def _mesh(shape_name):
  data, model = MESH_SHAPES[shape_name]
  return partitioning.make_mesh(data=data, model=model)


# ------------------------------------------------------------------ rules ---

# Hand-derived from T5X's table: per array, the spec in the columns
# (1,1), (2,1), (1,2), (2,2). 'embed' rules come last in every column, so a
# kernel's other dimension takes 'model' first; 'vocab' precedes 'mlp', so
# ('mlp', 'vocab') shards vocab.
_COLUMNS = ((1, 1), (2, 1), (1, 2), (2, 2))
_RESOLUTION_CASES = {
    ("batch", "length", "embed"): (P("data", None, None), P("data", None, "model"),
                                   P("data", None, None), P("data", None, "model")),
    ("embed", "mlp"): (P(None, "model"), P(None, "model"), P("data", "model"), P("data", "model")),
    ("mlp", "embed"): (P("model", None), P("model", None), P("model", "data"), P("model", "data")),
    ("vocab", "embed"): (P("model", None), P("model", None), P("model", "data"),
                         P("model", "data")),
    ("embed",): (P(None), P("model"), P("data"), P("model")),
    ("mlp", "vocab"): (P(None, "model"),) * 4,
    ("batch", "length", "heads", "kv"): (P("data", None, "model", None),) * 4,
    ("heads", "relpos_buckets"): (P("model", None),) * 4,
    ("not_a_t5x_axis",): (P(None),) * 4,
}


@pytest.mark.parametrize("axes,column,expected", [
    (axes, column, specs[i]) for axes, specs in _RESOLUTION_CASES.items()
    for i, column in enumerate(_COLUMNS)])
def test_standard_rules_resolve_like_t5x(axes, column, expected):
  rules = partitioning.standard_logical_axis_rules(*column)
  assert nn.logical_to_mesh_axes(axes, rules) == expected


def test_first_free_rule_wins_even_with_multi_axis_rules():
  rules = (("batch", ("data", "model")), ("embed", "model"), ("embed", "data"))
  # batch takes both mesh axes, so neither embed rule finds a free axis.
  assert nn.logical_to_mesh_axes(("batch", "embed"), rules) == P(("data", "model"), None)
  assert nn.logical_to_mesh_axes(("embed",), rules) == P("model")


def test_named_rule_sets_are_the_t5x_columns():
  assert partitioning.get_rules("tensor_parallel") == partitioning.standard_logical_axis_rules(1, 1)
  assert partitioning.get_rules("fsdp") == partitioning.standard_logical_axis_rules(1, 2)
  assert partitioning.get_rules("2d") == partitioning.standard_logical_axis_rules(2, 2)
  dp = partitioning.get_rules("data_parallel")
  assert [axes for _, axes in dp] == ["data"] + [None] * (len(dp) - 1)
  assert dp[0] == ("batch", "data")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_every_rule_set_names_every_t5_axis(name):
  # A logical name without a rule is silently replicated; make that a decision.
  used = {a for spec in jax.tree.leaves(t5.param_axes(CFG), is_leaf=lambda x: isinstance(x, P))
          for a in spec}
  used |= {"batch", "length", "kv"}
  assert used <= {logical for logical, _ in partitioning.get_rules(name)}


def test_rule_errors_are_actionable():
  with pytest.raises(ValueError, match=r"Unknown partitioning rule set 'zero3'.*'2d'.*'fsdp'"):
    partitioning.get_rules("zero3")
  with pytest.raises(ValueError, match=r"activation_partitioning_dims.*\(3, 1\)"):
    partitioning.standard_logical_axis_rules(3, 1)
  with pytest.raises(ValueError, match=r"rule 1 is \('embed', 7\)"):
    partitioning.as_rules([("batch", "data"), ("embed", 7)])
  extra = partitioning.standard_logical_axis_rules(additional_rules=[("experts", ["data"])])
  assert extra[-1] == ("experts", ("data",))


# ------------------------------------------------------------------- mesh ---

@pytest.mark.parametrize("kwargs,num_devices,shape", [
    ({}, 8, (8, 1)), ({"model": 4}, 8, (2, 4)), ({"data": 2, "model": -1}, 8, (2, 4)),
    ({"data": 1, "model": 1}, 8, (1, 1)), ({}, 4, (4, 1)), ({"model": 2}, 4, (2, 2)),
])
def test_make_mesh_shapes(kwargs, num_devices, shape):
  mesh = partitioning.make_mesh(**kwargs, devices=jax.devices()[:num_devices])
  assert mesh.axis_names == ("data", "model")
  assert tuple(mesh.devices.shape) == shape
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize("kwargs,message", [
    ({"model": 3}, r"data=-1, model=3.*model=3 does not divide the 8 available devices"),
    ({"data": 4, "model": 4}, r"data=4, model=4 \(16 devices\), but only 8 cpu devices"),
    ({"data": 0}, r"'data' must be a positive integer or -1.*got 0"),
    ({"data": -1, "model": -1}, r"At most one mesh axis may be -1.*8 devices exist"),
    ({"model": 2.0}, r"'model' must be a positive integer"),
])
def test_make_mesh_errors_say_what_was_asked(kwargs, message):
  with pytest.raises(ValueError, match=message):
    partitioning.make_mesh(**kwargs)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert partitioning.initialize_distributed() is False
  assert partitioning.initialize_distributed("localhost:1234", num_processes=1,
                                             process_id=0) is False
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\).*got 2"):
    partitioning.initialize_distributed("localhost:1234", num_processes=2, process_id=2)


GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin",
                       "partitioning")


@pytest.mark.parametrize("name,rules,shape", [
    ("cpu", "data_parallel", (1, 1)), ("data_parallel", "data_parallel", (8, 1)),
    ("fsdp", "fsdp", (8, 1)), ("tensor_parallel", "tensor_parallel", (1, 8)), ("2d", "2d", (1, 8)),
])
def test_gin_files_bind_a_rule_set_and_a_mesh(name, rules, shape):
  gin = pytest.importorskip("gin")
  with gin.unlock_config():
    gin.clear_config()
    try:
      gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, f"{name}.gin")], [])
      bound = {m: gin.query_parameter(f"%{m}")
               for m in ("PARTITIONING_RULES", "MESH_DATA", "MESH_MODEL")}
    finally:
      gin.clear_config()
  assert bound["PARTITIONING_RULES"] == rules
  mesh = partitioning.make_mesh(data=bound["MESH_DATA"], model=bound["MESH_MODEL"])
  assert tuple(mesh.devices.shape) == shape


# ------------------------------------------------------------- shardings ---

_Q = ("encoder", "layers_0", "attention", "query", "kernel")          # (embed, joined_kv)
_O = ("decoder", "layers_1", "self_attention", "out", "kernel")        # (joined_kv, embed)
_WI = ("decoder", "layers_0", "mlp", "wi_1", "kernel")                 # (embed, mlp)
_WO = ("encoder", "layers_1", "mlp", "wo", "kernel")                   # (mlp, embed)
_EMB = ("token_embedder", "embedding")                                 # (vocab, embed)
_LOGITS = ("decoder", "logits_dense", "kernel")                        # (embed, vocab)
_REL = ("encoder", "relpos_bias", "rel_embedding")                     # (heads, relpos_buckets)
_NORM = ("decoder", "layers_0", "pre_mlp_layer_norm", "scale")         # (embed,)

_EMBED_FIRST = (_Q, _WI, _LOGITS)
_EMBED_LAST = (_O, _WO, _EMB)
_EXPECTED_SPECS = {  # (embed, X) kernels, (X, embed) kernels, rel_embedding, norm scales
    "data_parallel": (P(None, None), P(None, None), P(None, None), P(None)),
    "fsdp": (P("data", "model"), P("model", "data"), P("model", None), P("data")),
    "tensor_parallel": (P(None, "model"), P("model", None), P("model", None), P(None)),
    "2d": (P("data", "model"), P("model", "data"), P("model", None), P("model")),
}
# What one device holds of the [32, 32] query kernel.
_QUERY_SHARD_SHAPES = {
    "2x4": {"data_parallel": (32, 32), "fsdp": (16, 8), "tensor_parallel": (32, 8), "2d": (16, 8)},
    "8x1": {"data_parallel": (32, 32), "fsdp": (4, 32), "tensor_parallel": (32, 32),
            "2d": (4, 32)},
}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("rules", RULE_NAMES)
@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
def test_param_shardings_match_hand_derived_specs(mesh_name, rules):
  mesh = _mesh(mesh_name)
  shardings = partitioning.param_shardings(CFG, mesh, rules)
  assert jax.tree.structure(shardings) == jax.tree.structure(t5.abstract_params(CFG))
  embed_first, embed_last, rel, norm = _EXPECTED_SPECS[rules]
  expected = {**{p: embed_first for p in _EMBED_FIRST}, **{p: embed_last for p in _EMBED_LAST},
              _REL: rel, _NORM: norm}
  for path, spec in expected.items():
    sharding = _get(shardings, path)
    assert sharding.mesh is mesh
    assert sharding.spec == spec, (path, sharding.spec, spec)
  assert _get(shardings, _Q).shard_shape((32, 32)) == _QUERY_SHARD_SHAPES[mesh_name][rules]


def test_param_shardings_reject_indivisible_dimensions():
  # 4 heads x 3 = 12 columns cannot be split over 8 'model' devices.
  config = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=3, mlp_dim=64,
                       num_encoder_layers=1, num_decoder_layers=1, dtype="float32")
  with pytest.raises(ValueError, match=r"attention/\w+/kernel \(shape \(\d+, \d+\).*"
                                       r"'joined_kv', size 12.*\('model',\) = 8 devices"):
    partitioning.param_shardings(config, partitioning.make_mesh(data=1, model=8),
                                 "tensor_parallel")


def test_sharded_init_creates_params_in_their_shards(reference):
  mesh = _mesh("2x4")
  params = partitioning.sharded_init(CFG, jax.random.key(1), mesh, "2d")
  expected = partitioning.param_shardings(CFG, mesh, "2d")
  for x, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
  query = _get(params, _Q)
  assert {tuple(s.data.shape) for s in query.addressable_shards} == {(16, 8)}
  # The same random bits as on one device (reference[0] is a jitted init with this key).
  jax.tree.map(np.testing.assert_array_equal, params, reference[0])


def test_batch_sharding_and_validation():
  mesh = _mesh("2x4")
  assert partitioning.batch_sharding(mesh).spec == P("data", None)
  assert partitioning.batch_sharding(mesh, ndim=1).spec == P("data")
  partitioning.validate_batch_size(6, mesh)
  with pytest.raises(ValueError, match=r"train_batch_size=5 is not divisible by the mesh 'data' "
                                       r"axis size 2 .*Use train_batch_size=4 or 6"):
    partitioning.validate_batch_size(5, mesh, what="train_batch_size")
  with pytest.raises(ValueError, match=r"batch_size=3 .* size 8 .*Use batch_size=8, or a 'data' "
                                       r"axis size \(MESH_DATA\) that divides 3"):
    partitioning.validate_batch_size(3, _mesh("8x1"))
  with pytest.raises(ValueError, match="positive integer, got 0"):
    partitioning.validate_batch_size(0, mesh)


def test_shard_batch_builds_global_arrays():
  mesh = _mesh("8x1")
  tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  labels = np.linspace(0, 1, 8, dtype=np.float32)
  batch = partitioning.shard_batch({"tokens": tokens, "label": labels}, mesh)
  assert batch["tokens"].sharding.spec == P("data", None)
  assert batch["label"].sharding.spec == P("data")
  np.testing.assert_array_equal(batch["tokens"], tokens)
  np.testing.assert_array_equal(batch["label"], labels)
  shard = next(s for s in batch["tokens"].addressable_shards if s.index[0].start == 3)
  np.testing.assert_array_equal(shard.data, tokens[3:4])
  with pytest.raises(ValueError, match=r"rows of batch\['tokens'\]\)=6 is not divisible"):
    partitioning.shard_batch({"tokens": tokens[:6]}, mesh)
  with pytest.raises(ValueError, match=r"batch\['label'\] has 4 rows but batch\['tokens'\] has 8"):
    partitioning.shard_batch({"tokens": tokens, "label": labels[:4]}, mesh)
  with pytest.raises(ValueError, match=r"batch\['step'\] is a scalar"):
    partitioning.shard_batch({"step": 3}, mesh)
  assert partitioning.process_data_shard(mesh) == (0, 1)


def test_jit_sharded_resolves_activation_constraints_per_rule_set():
  mesh = _mesh("2x4")

  def double(x):
    return nn.with_logical_constraint(2 * x, ("batch", "embed"))

  x = jax.device_put(np.ones((4, 8), np.float32), partitioning.batch_sharding(mesh))
  specs = {}
  for name in ("tensor_parallel", "2d"):
    f = partitioning.jit_sharded(double, mesh=mesh, rules=name, in_shardings=None,
                                 out_shardings=None)
    out = f(x)
    np.testing.assert_array_equal(out, 2 * np.ones((4, 8)))
    specs[name] = out.sharding.spec
  # Same function, same inputs: only the rules differ, and so must the result.
  assert specs == {"tensor_parallel": P("data", None), "2d": P("data", "model")}


# ------------------------------------------------- sharded == one device ---

def _batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(2, CFG.vocab_size, (8, 12)).astype(np.int32)
  enc[:, 9:] = 0
  enc[3, 4:] = 0
  tgt = rng.integers(2, CFG.vocab_size, (8, 7)).astype(np.int32)
  tgt[:, 5], tgt[:, 6] = t5.EOS_ID, 0
  tgt[5, 2:] = 0
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
          "decoder_input_tokens": np.asarray(t5.shift_right(tgt))}


def _logits(params, batch, config=CFG):
  return t5.Transformer(config).apply({"params": params}, batch["encoder_input_tokens"],
                                      batch["decoder_input_tokens"],
                                      batch["decoder_target_tokens"])


def _loss_and_grads(params, batch):
  """Summed token cross-entropy over non-padding targets, its logits and gradients."""
  def loss(p):
    logits = _logits(p, batch)
    targets = batch["decoder_target_tokens"]
    token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
    return -jnp.sum(token_lp[..., 0] * (targets > 0)), logits
  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, logits, grads


@pytest.fixture(scope="module")
def reference():
  params = jax.jit(functools.partial(t5.init_params, CFG))(jax.random.key(1))
  value, logits, grads = jax.jit(_loss_and_grads)(params, _batch())
  return params, value, logits, grads


@pytest.mark.parametrize("mesh_name,rules", [("2x4", r) for r in RULE_NAMES] + [("8x1", "fsdp")])
def test_sharded_logits_and_gradients_match_one_device(reference, mesh_name, rules):
  params, ref_value, ref_logits, ref_grads = reference
  mesh = _mesh(mesh_name)
  shardings = partitioning.param_shardings(CFG, mesh, rules)
  step = partitioning.jit_sharded(
      _loss_and_grads, mesh=mesh, rules=rules,
      in_shardings=(shardings, partitioning.batch_sharding(mesh)),
      out_shardings=(partitioning.replicated(mesh), NamedSharding(mesh, P("data")), shardings))
  value, logits, grads = step(jax.device_put(params, shardings),
                              partitioning.shard_batch(_batch(), mesh))
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(ref_grads)):
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(g, ref, rtol=0, atol=2e-5 * max(scale, 1.0),
                               err_msg=jax.tree_util.keystr(path))


def test_sharded_greedy_samples_match_one_device(reference):
  sampling = pytest.importorskip("t5align.sampling")
  rules = "2d"  # constrains activations over both mesh axes, the strictest rule set
  params = reference[0]
  prompts = _batch()["encoder_input_tokens"]
  draw = functools.partial(sampling.sample, config=CFG, rng=jax.random.key(2), temperature=0.0,
                           max_decode_length=6, min_decode_length=6)
  expected = draw(params, jnp.asarray(prompts))
  mesh = _mesh("2x4")
  shardings = partitioning.param_shardings(CFG, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.get_rules(rules)):
    got = draw(jax.device_put(params, shardings), partitioning.shard_batch(
        {"prompts": prompts}, mesh)["prompts"])
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_allclose(got.policy_log_probs, expected.policy_log_probs, atol=1e-5)


# -------------------------------------------------------------- placement ---

def test_placement_sends_each_device_only_its_shards(reference):
  host = jax.tree.map(np.asarray, reference[0])
  placement = partitioning.Placement.create(rules="fsdp", data=2, model=4)
  placed = placement.params(host, CFG)
  expected = partitioning.param_shardings(CFG, placement.mesh, "fsdp")
  for (path, leaf), want, value in zip(jax.tree_util.tree_flatten_with_path(placed)[0],
                                       jax.tree.leaves(expected), jax.tree.leaves(host)):
    assert leaf.sharding == want and leaf.dtype == np.float32, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(leaf), value)
  embedding = placed["token_embedder"]["embedding"]  # (vocab, embed) -> (model, data)
  assert {s.data.shape for s in embedding.addressable_shards} == {(128 // 4, 32 // 2)}
  # Parameters already on a device are resharded, not copied through the host.
  again = placement.params(jax.device_put(host), CFG)
  assert again["token_embedder"]["embedding"].sharding == embedding.sharding


@pytest.mark.parametrize("rules,data,model", [("fsdp", 2, 4), ("2d", 2, 4), ("data_parallel", 8, 1)])
def test_placement_map_batches_matches_one_device(reference, rules, data, model):
  params = reference[0]
  batch = _batch()
  expected = np.asarray(jax.jit(_logits)(params, batch))
  placement = partitioning.Placement.create(rules=rules, data=data, model=model)
  placed = placement.params(params, CFG)
  forward = jax.jit(_logits)
  keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
  batch_size = 2 * data  # 8 rows: several batches, the last one filled up unless it divides

  def fn(b, *rows):
    return forward(placed, dict(zip(keys, rows))), jnp.full((batch_size,), b)

  logits, index = placement.map_batches(fn, [batch[k] for k in keys], batch_size)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(index, np.arange(8) // batch_size)
  with pytest.raises(ValueError, match=f"batch_size=3 is not divisible by the mesh 'data' axis "
                                       f"size {data}"):
    placement.map_batches(fn, [batch[k] for k in keys], 3)


# ---------------------------------------------------------- multi-process ---

def _multiprocess_worker(port: int, process_id: int) -> None:
  """One of two CPU processes; checks its shards of a sharded forward pass."""
  config = dataclasses.replace(CFG, num_encoder_layers=1, num_decoder_layers=1)  # compiles faster
  logits_fn = functools.partial(_logits, config=config)
  assert partitioning.initialize_distributed(f"localhost:{port}", num_processes=2,
                                             process_id=process_id)
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  mesh = partitioning.make_mesh(data=4, model=2)
  # Each process's 4 devices hold two consecutive 'data' indices (2 rows each).
  data_indices = sorted({i for (i, _), d in np.ndenumerate(mesh.devices)
                         if d.process_index == process_id})
  assert len(data_indices) == 2 and data_indices[1] == data_indices[0] + 1
  assert partitioning.process_data_shard(mesh) == (data_indices[0] // 2, 2)
  rows = np.arange(2 * data_indices[0], 2 * data_indices[-1] + 2)
  full = _batch()
  local = partitioning.shard_batch({k: v[rows] for k, v in full.items()}, mesh)
  assert local["encoder_input_tokens"].shape == (8, 12)

  params = partitioning.sharded_init(config, jax.random.key(1), mesh, "fsdp")
  forward = partitioning.jit_sharded(
      logits_fn, mesh=mesh, rules="fsdp",
      in_shardings=(partitioning.param_shardings(config, mesh, "fsdp"),
                    partitioning.batch_sharding(mesh)),
      out_shardings=NamedSharding(mesh, P("data")))
  logits = forward(params, local)

  # One device of this process recomputes everything from the gathered parameters.
  full_params = multihost_utils.process_allgather(params, tiled=True)
  with jax.default_device(jax.local_devices()[0]):
    expected = np.asarray(jax.jit(logits_fn)(full_params, full))
  assert len(logits.addressable_shards) == 4
  for shard in logits.addressable_shards:
    np.testing.assert_allclose(shard.data, expected[shard.index], rtol=1e-5, atol=1e-5)

  # A Placement: host parameters onto the global mesh, global row batches in,
  # whole numpy results out on both processes.
  placement = partitioning.Placement(mesh, "fsdp")
  placed = placement.params(jax.tree.map(np.asarray, full_params), config)
  forward_global = jax.jit(logits_fn)
  keys = sorted(full)
  (gathered,) = placement.map_batches(
      lambda _, *rows: forward_global(placed, dict(zip(keys, rows))), [full[k] for k in keys],
      batch_size=4)
  assert isinstance(gathered, np.ndarray) and gathered.shape == expected.shape
  np.testing.assert_allclose(gathered, expected, rtol=1e-5, atol=1e-5)
  print(f"process {process_id} ok", flush=True)


def test_two_cpu_processes_share_one_mesh(run_two_processes):
  run_two_processes(lambda port, i: [sys.executable, os.path.abspath(__file__), str(port), str(i)],
                    timeout=180)


if __name__ == "__main__":
  _multiprocess_worker(int(sys.argv[1]), int(sys.argv[2]))
