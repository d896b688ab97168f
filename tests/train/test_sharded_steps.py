"""The training and online steps, sharded, give the one-device results.

Runs the stages' own plumbing (``stages._Runtime``: mesh, parameter
shardings, ``state_fns`` with optimizer slots sharded like their parameters,
``jit_step`` with state donation) on the 8 fake CPU devices of
tests/conftest.py, for every rule set on a 2x4 and an 8x1 mesh, and compares
parameters and metrics after two steps with the same run on a 1x1 mesh
(device 0). The online sample -> label -> score function
(``pair_sources.online_pairs``) runs under the mesh with sharded parameters
and must draw the same tokens. The last test repeats both across two CPU
processes (4 devices each) joined through jax.distributed and gloo, each
feeding only its own rows.

Tolerances are float32 round-off: sharding changes the order of the sums in
matmuls and reductions, nothing else.
"""

import dataclasses
import functools
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5align import partitioning
from t5align.models import preference
from t5align.models import t5
from t5align.train import optimizers
from t5align.train import pair_sources
from t5align.train import stages
from t5align.train import steps

CFG = t5.T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, dtype="float32")
BATCH, PROMPT_LEN, TARGET_LEN = 8, 8, 6
NUM_STEPS = 2
MESH_SHAPES = {"2x4": (2, 4), "8x1": (8, 1)}
RULE_NAMES = ("data_parallel", "fsdp", "tensor_parallel", "2d")
ONE_DEVICE = stages.Partitioning(rules="data_parallel", data=1, model=1)
LOSS = steps.AlignLoss(name="ipo", beta=0.1)
RTOL, ATOL = 1e-5, 1e-6
# delta_mean and the implicit rewards are differences of ~30-nat sequence
# log-probs: their round-off is absolute (about 30 * 2^-24 per term, seen up
# to 2e-6), not relative to their own small values.
METRICS_ATOL = 1e-5


def _tx():
  # Factoring from 32 on (T5X: 128) so that Adafactor's v_row / v_col slots of
  # this tiny model exist and get sharded like at full size.
  return optimizers.make_optimizer(
      name="adafactor", learning_rate=1e-2,
      adafactor=optimizers.AdafactorSettings(min_dim_size_to_factor=32))


@functools.lru_cache(maxsize=None)
def _init_params(config: t5.T5Config, seed: int) -> dict:
  # Jitted: one compilation is cheaper than flax's op-by-op initialisation.
  init = jax.jit(t5.init_params, static_argnums=0)
  return jax.tree.map(np.asarray, init(config, jax.random.key(seed)))


def _responses(rng, rows):
  tokens = rng.integers(2, CFG.vocab_size, (rows, TARGET_LEN)).astype(np.int32)
  length = rng.integers(2, TARGET_LEN + 1, rows)  # EOS included
  for i, n in enumerate(length):
    tokens[i, n - 1], tokens[i, n:] = t5.EOS_ID, t5.PAD_ID
  return tokens


def _prompts(rng, rows=BATCH):
  prompt = rng.integers(2, CFG.vocab_size, (rows, PROMPT_LEN)).astype(np.int32)
  for i, n in enumerate(rng.integers(3, PROMPT_LEN + 1, rows)):
    prompt[i, n:] = t5.PAD_ID
  return prompt


def pair_batch() -> dict:
  """A fixed alignment batch; one soft label, reference log-probs near the policy's."""
  rng = np.random.default_rng(0)
  label = np.ones(BATCH, np.float32)
  label[3] = 0.75
  return {"prompt": _prompts(rng), "chosen": _responses(rng, BATCH),
          "rejected": _responses(rng, BATCH), "label": label,
          "ref_chosen": rng.uniform(-30, -10, BATCH).astype(np.float32),
          "ref_rejected": rng.uniform(-30, -10, BATCH).astype(np.float32)}


def sft_batch() -> dict:
  rng = np.random.default_rng(1)
  return {"inputs": _prompts(rng), "targets": _responses(rng, BATCH)}


def align_step(config, tx):
  return steps.make_align_step(config, tx, LOSS)


def train(make_step, batch: dict, part: stages.Partitioning, config: t5.T5Config = CFG):
  """Two steps through the stages' runtime; returns numpy (params, per-step metrics).

  ``batch`` holds this process's rows (all of them in a single process).
  """
  runtime = stages._Runtime(config, part, BATCH)  # pylint: disable=protected-access
  tx = _tx()
  init_state, _, shardings = runtime.state_fns(lambda: _init_params(config, 0), tx, seed=0)
  step = runtime.jit_step(make_step(config, tx), shardings)
  state = init_state()
  sharded_batch = partitioning.shard_batch(batch, runtime.mesh)
  history = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, sharded_batch)
    history.append(metrics)
  # The parameters stay in the rule set's shardings through the updates.
  for x, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(runtime.param_shardings)):
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params, history = multihost_utils.process_allgather((state.params, history), tiled=True)
  else:
    params = state.params
  return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, history)


def assert_trees_close(got, expected, rtol=RTOL, atol=ATOL):
  paths_got = jax.tree_util.tree_flatten_with_path(got)[0]
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for (path, x), y in zip(paths_got, jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _assert_trained(params, config=CFG):
  # Equality with the reference must not be vacuous: every parameter moved.
  init = _init_params(config, 0)
  for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree.leaves(init)):
    assert np.abs(new - old).max() > 1e-4, jax.tree_util.keystr(path)


@pytest.fixture(scope="module", autouse=True)
def _cheap_backend_compiles():
  # Compilation dominates this file. Skipping LLVM's optimisation passes
  # halves it; sharding is decided earlier, by XLA's SPMD partitioner, and the
  # one-device references compile in the same mode.
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def align_reference():
  params, history = train(align_step, pair_batch(), ONE_DEVICE)
  _assert_trained(params)
  return params, history


# ------------------------------------------------------- 8 fake devices ---

@pytest.mark.parametrize("rules", RULE_NAMES)
@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
def test_align_step_sharded_matches_one_device(align_reference, mesh_name, rules):
  data, model = MESH_SHAPES[mesh_name]
  params, history = train(align_step, pair_batch(),
                          stages.Partitioning(rules=rules, data=data, model=model))
  ref_params, ref_history = align_reference
  assert_trees_close(history, ref_history, atol=METRICS_ATOL)
  assert_trees_close(params, ref_params)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_optimizer_slots_are_sharded_like_their_parameters(name):
  # fsdp keeps 1/N of the optimizer state per device (docs/sharding.md): a
  # slot shaped like a parameter (Adam moments; Adafactor v, unfactored at
  # these sizes) takes its parameter's sharding, counters stay replicated.
  part = stages.Partitioning(rules="fsdp", data=2, model=4)
  runtime = stages._Runtime(CFG, part, BATCH)  # pylint: disable=protected-access
  tx = optimizers.make_optimizer(name=name, learning_rate=1e-3)
  init_state, abstract, shardings = runtime.state_fns(lambda: _init_params(CFG, 0), tx, seed=0)
  owners = {jax.tree_util.keystr(p): (a.shape, s) for (p, a), s in zip(
      jax.tree_util.tree_flatten_with_path(t5.abstract_params(CFG))[0],
      jax.tree.leaves(runtime.param_shardings))}
  state = init_state()
  slots = 0
  for (path, leaf), sharding, value in zip(
      jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0],
      jax.tree.leaves(shardings.opt_state), jax.tree.leaves(state.opt_state)):
    key = jax.tree_util.keystr(path)
    owner = [owners[p] for p in owners if key.endswith(p) and owners[p][0] == leaf.shape]
    expected = owner[0][1] if owner else partitioning.replicated(runtime.mesh)
    slots += bool(owner)
    assert sharding.is_equivalent_to(expected, leaf.ndim), (key, sharding, expected)
    assert value.sharding.is_equivalent_to(expected, leaf.ndim), (key, value.sharding, expected)
  assert slots == {"adafactor": 1, "adamw": 2}[name] * len(owners)


def test_sft_step_with_dropout_sharded_matches_one_device():
  # Dropout on: its masks come from fold_in(state.rng, step) and must not
  # depend on the sharding (JAX's partitionable threefry).
  config = dataclasses.replace(CFG, dropout_rate=0.1)
  make_step = functools.partial(steps.make_sft_step, z_loss=1e-4, enable_dropout=True)
  ref_params, ref_history = train(make_step, sft_batch(), ONE_DEVICE, config)
  _assert_trained(ref_params, config)
  params, history = train(make_step, sft_batch(),
                          stages.Partitioning(rules="2d", data=2, model=4), config)
  assert_trees_close(history, ref_history, atol=METRICS_ATOL)
  assert_trees_close(params, ref_params)


FMT = preference.PairFormat(response_1_marker=(120,), response_2_marker=(121,), first_token=122,
                            second_token=123)
SETTINGS = pair_sources.OnlineSettings(
    policy_config=CFG, pm_config=CFG, pair_format=FMT,
    pm_input_length=PROMPT_LEN + 2 * TARGET_LEN + 3, max_decode_length=TARGET_LEN,
    temperature=1.0, reduction="sum")


def online_prompts():
  return _prompts(np.random.default_rng(2))


def online_params():
  return [_init_params(CFG, seed) for seed in (0, 1, 2)]  # policy, reference, PM


def online_sharded(mesh, rules: str, local_prompts: np.ndarray) -> dict:
  """``online_pairs`` under ``mesh`` and ``rules`` with sharded parameters and prompts."""
  shardings = partitioning.param_shardings(CFG, mesh, rules)
  params = [jax.device_put(p, shardings) for p in online_params()]
  prompts = partitioning.shard_batch({"prompt": local_prompts}, mesh)["prompt"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.get_rules(rules)):
    return pair_sources.online_pairs(*params, prompts, jax.random.key(3), settings=SETTINGS)


def assert_online_equal(got, expected):
  for key in ("prompt", "chosen", "rejected", "label"):
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  for key in ("ref_chosen", "ref_rejected", "pm_margin"):
    np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.fixture(scope="module")
def online_reference():
  with jax.default_device(jax.devices()[0]):
    out = pair_sources.online_pairs(*online_params(), online_prompts(), jax.random.key(3),
                                    settings=SETTINGS)
  out = jax.tree.map(np.asarray, out)
  # The PM must really decide (no ties) and the two samples differ, else the
  # label/ordering comparison below would be vacuous.
  assert np.all(out["pm_margin"] > 1e-4), out["pm_margin"]
  assert np.all(out["label"] == 1.0)
  assert np.any(out["chosen"] != out["rejected"], axis=1).all()
  return out


def test_online_pairs_under_mesh_match_one_device(online_reference):
  # 2d: the rule set that constrains activations over both mesh axes.
  got = online_sharded(partitioning.make_mesh(data=2, model=4), "2d", online_prompts())
  assert_online_equal(jax.tree.map(np.asarray, got), online_reference)


# ---------------------------------------------------- two CPU processes ---

# Importing this module runs JAX code (AlignLoss validates itself, also in
# t5align.train.stages' defaults), so a worker joins the run first.
_WORKER = """
import importlib.util, sys
from t5align import partitioning
port, process_id, test_file, out_path = sys.argv[1:]
assert partitioning.initialize_distributed(f"127.0.0.1:{port}", num_processes=2,
                                           process_id=int(process_id))
spec = importlib.util.spec_from_file_location("sharded_steps_worker", test_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.two_process_worker(int(process_id), out_path)
"""


def two_process_worker(process_id: int, out_path: str) -> None:
  """One of two processes (4 CPU devices each): align steps and online pairs on a 2x4 mesh."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  part = stages.Partitioning(rules="fsdp", data=2, model=4)
  mesh = partitioning.make_mesh(data=part.data, model=part.model)
  # 'model' stays inside a process and 'data' spans the two: each process
  # feeds one half of the rows, and fsdp splits every kernel across both.
  index, num_blocks = partitioning.process_data_shard(mesh)
  assert num_blocks == 2
  rows = slice(index * BATCH // num_blocks, (index + 1) * BATCH // num_blocks)
  params, history = train(align_step, {k: v[rows] for k, v in pair_batch().items()}, part)
  online = online_sharded(mesh, part.rules, online_prompts()[rows])
  online = jax.tree.map(np.asarray, multihost_utils.process_allgather(online, tiled=True))
  if process_id == 0:
    flat = {f"params{jax.tree_util.keystr(p)}": x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat.update({f"metrics_{i}_{k}": v for i, m in enumerate(history) for k, v in m.items()})
    flat.update({f"online_{k}": v for k, v in online.items()})
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, out_path)
  print(f"process {process_id} ok", flush=True)


# ~12-50 s on two shared cores: two fresh interpreters import TensorFlow (via
# seqio) and compile.
@pytest.mark.slow
def test_two_processes_match_one_device(align_reference, online_reference, tmp_path,
                                        run_two_processes):
  out_path = str(tmp_path / "two_process.npz")
  run_two_processes(lambda port, i: [sys.executable, "-c", _WORKER, str(port), str(i),
                                     os.path.abspath(__file__), out_path],
                    timeout=300, env={"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
  ref_params, ref_history = align_reference
  with np.load(out_path) as saved:
    params = jax.tree_util.tree_map_with_path(
        lambda p, _: saved[f"params{jax.tree_util.keystr(p)}"], ref_params)
    history = [{k: saved[f"metrics_{i}_{k}"] for k in m} for i, m in enumerate(ref_history)]
    online = {k: saved[f"online_{k}"] for k in online_reference}
  assert_trees_close(history, ref_history, atol=METRICS_ATOL)
  assert_trees_close(params, ref_params)
  assert_online_equal(online, online_reference)
