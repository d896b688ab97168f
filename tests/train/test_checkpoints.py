"""Tests of t5align.train.checkpoints: save/restore, keep-N, shardings, params.

Kill-during-save (Orbax's temporary directory protocol) is tested with real
processes in test_loop.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from t5align.train import checkpoints
from t5align.train import state as state_lib

TX = optax.adam(0.1)


def make_state(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)),
                                            jnp.float32)},
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  state = state_lib.TrainState.create(params=params, tx=TX,
                                      rng=jax.random.key(seed))
  # One real update so the optimizer moments and the step are non-trivial.
  grads = jax.tree.map(jnp.ones_like, params)
  state = state.apply_gradients(grads, TX)
  state, _ = state.split_rng()
  return state


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_state_helpers():
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optax.sgd(0.5)
  key = jax.random.key(3)
  state = state_lib.TrainState.create(params=params, tx=tx, rng=key)
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  assert state.rng.dtype == jnp.uint32
  np.testing.assert_array_equal(state.rng, jax.random.key_data(key))
  state = state.apply_gradients({"w": jnp.array([2.0, 4.0])}, tx)
  # sgd: w - 0.5 * g
  np.testing.assert_array_equal(state.params["w"], [0.0, -4.0])
  assert int(state.step) == 1
  new_state, subkey = state.split_rng()
  expected_key, expected_sub = jax.random.split(key)
  np.testing.assert_array_equal(new_state.rng,
                                jax.random.key_data(expected_key))
  np.testing.assert_array_equal(jax.random.key_data(subkey),
                                jax.random.key_data(expected_sub))


def test_save_restore_roundtrip(tmp_path):
  state = make_state()
  with checkpoints.Checkpointer(tmp_path / "ckpt", keep=3,
                                save_interval_steps=5) as ckpt:
    assert ckpt.latest_step() is None
    assert not ckpt.should_save(3)
    assert ckpt.should_save(5)
    assert ckpt.save(5, state, {"epoch": 1, "index": 37})
    assert not ckpt.save(7, state, {"index": 0})  # not due
    assert ckpt.save(7, state, {"index": 0}, force=True)
    assert not ckpt.save(7, state, {"index": 1}, force=True)  # exists
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert ckpt.all_steps() == [5, 7]
    restored, data_state = ckpt.restore(
        5, abstract_state=checkpoints.abstract_tree(state))
  assert isinstance(restored, state_lib.TrainState)
  assert data_state == {"epoch": 1, "index": 37}
  assert_trees_equal(restored, state)
  assert checkpoints.list_steps(tmp_path / "ckpt") == [5, 7]

  # A new Checkpointer on the same directory (a restarted process) sees both.
  with checkpoints.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 7
    _, data_state = ckpt.restore(abstract_state=checkpoints.abstract_tree(
        state))
    assert data_state == {"index": 0}


def test_async_save_does_not_need_the_device_buffers(tmp_path):
  # A jitted step that donates the state frees its buffers while the
  # checkpoint is still being written.
  state = make_state()
  expected = jax.tree.map(np.array, state)
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {"index": 1})
    for leaf in jax.tree.leaves(state):
      leaf.delete()
    restored, _ = ckpt.restore(abstract_state=checkpoints.abstract_tree(
        expected))
  assert_trees_equal(restored, expected)


def test_keep_n(tmp_path):
  state = make_state()
  with checkpoints.Checkpointer(tmp_path, keep=2,
                                save_interval_steps=1) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, state, {"index": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert checkpoints.list_steps(tmp_path) == [4, 5]
  assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_errors(tmp_path):
  state = make_state()
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(abstract_state=checkpoints.abstract_tree(state))
    with pytest.raises(ValueError, match="step 1 is not JSON"):
      ckpt.save(1, state, {"index": object()})
    ckpt.save(1, state, {"index": 1})
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match="step 2"):
      ckpt.restore(2, abstract_state=checkpoints.abstract_tree(state))
  with pytest.raises(FileNotFoundError, match="step 9"):
    checkpoints.load_params(tmp_path, 9)
  with pytest.raises(ValueError, match="one step directory"):
    checkpoints.load_params(tmp_path / "1", 1)
  with pytest.raises(FileNotFoundError, match="no finalized checkpoint"):
    checkpoints.load_params(tmp_path / "empty")


def test_load_params_without_optimizer_structure(tmp_path):
  old, new = make_state(0), make_state(1)
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, old, {"index": 1})
    ckpt.save(2, new, {"index": 2})
    from_manager = ckpt.restore_params(1)
  latest = checkpoints.load_params(tmp_path)
  first = checkpoints.load_params(tmp_path, 1)
  from_step_dir = checkpoints.load_params(tmp_path / "1")
  assert isinstance(latest["dense"]["kernel"], np.ndarray)
  assert_trees_equal(latest, new.params)
  assert_trees_equal(first, old.params)
  assert_trees_equal(from_step_dir, old.params)
  assert_trees_equal(from_manager, old.params)


def test_restore_onto_mesh_shardings(tmp_path):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",))
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data", None))
  state = make_state()
  # Saved replicated, restored with the kernel split over 8 devices.
  saved = jax.device_put(state, replicated)
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, saved, {"index": 1})
    abstract = checkpoints.abstract_tree(saved)
    abstract = abstract.replace(params={
        "dense": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                                 sharding=rows)},
        "bias": abstract.params["bias"]})
    restored, _ = ckpt.restore(abstract_state=abstract)
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding == rows
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[3].data.shape == (1, 4)
  np.testing.assert_array_equal(
      kernel.addressable_shards[3].data,
      np.asarray(state.params["dense"]["kernel"])[3:4])
  assert restored.params["bias"].sharding == replicated
  assert_trees_equal(restored, state)

  params = checkpoints.load_params(tmp_path, abstract_params=abstract.params)
  assert params["dense"]["kernel"].sharding == rows
  assert_trees_equal(params, state.params)
