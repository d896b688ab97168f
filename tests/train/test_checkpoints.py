"""Tests of t5align.train.checkpoints: save/restore, keep-N, shardings, params.

Kill-during-save (Orbax's temporary directory protocol) is tested with real
processes in test_loop.py.
"""

import json
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


def data_files(step_dir):
  """The array data files of a step (what bit rot or a bad copy hits)."""
  found = []
  for root, _, names in os.walk(os.path.join(step_dir, checkpoints.STATE)):
    found += [os.path.join(root, n) for n in names
              if os.path.basename(root) == "d"]
  assert found, step_dir
  return sorted(found)


def flip_bytes(path, count=64):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = len(data) // 2 - count // 2
    for i in range(max(start, 0), min(start + count, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def damage(step_dir, kind):
  """Damages `step_dir` one way; returns the file the error must name."""
  step_dir = str(step_dir)
  if kind == "flipped":
    for path in data_files(step_dir):
      flip_bytes(path)
    return os.path.relpath(data_files(step_dir)[0], step_dir)
  if kind == "truncated":
    path = data_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)
  elif kind == "deleted":
    path = data_files(step_dir)[0]
    os.remove(path)
  elif kind == "data_state":
    path = os.path.join(step_dir, checkpoints.DATA_STATE, "metadata")
    with open(path, "w") as f:
      f.write('{"index": 9')
  elif kind == "manifest_deleted":
    path = os.path.join(step_dir, checkpoints.MANIFEST)
    os.remove(path)
  elif kind == "manifest_garbled":
    path = os.path.join(step_dir, checkpoints.MANIFEST)
    flip_bytes(path, 8)
  else:
    raise ValueError(kind)
  return os.path.relpath(path, step_dir)


DAMAGES = ["flipped", "truncated", "deleted", "data_state", "manifest_deleted",
           "manifest_garbled"]


def test_every_step_has_a_manifest_of_its_files(tmp_path):
  state = make_state()
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {"index": 1})
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1,
                                async_save=False) as ckpt:
    ckpt.save(2, state, {"index": 2})
  for step in (1, 2):
    step_dir = tmp_path / str(step)
    with open(step_dir / checkpoints.MANIFEST) as f:
      files = json.load(f)["files"]
    on_disk = sorted(
        os.path.relpath(os.path.join(root, n), step_dir)
        for root, _, names in os.walk(step_dir) for n in names
        if n != checkpoints.MANIFEST)
    assert sorted(files) == on_disk
    assert any(name.startswith("state/") for name in files)
    assert f"{checkpoints.DATA_STATE}/metadata" in files
    assert checkpoints.verify_step(tmp_path, step)


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_step_is_refused_by_name(tmp_path, kind):
  state = make_state()
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {"index": 1})
    ckpt.save(2, state, {"index": 2})
  bad = damage(tmp_path / "2", kind)
  step_dir = str(tmp_path / "2")
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    checkpoints.load_params(tmp_path)
  assert error.value.step_dir == step_dir and error.value.file == bad
  assert str(error.value).startswith(f"damaged checkpoint {step_dir}: {bad}: ")
  assert "\n" not in str(error.value)
  with pytest.raises(checkpoints.DamagedCheckpointError, match=step_dir):
    checkpoints.load_params(step_dir)
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoints.DamagedCheckpointError, match=step_dir):
      ckpt.restore(abstract_state=checkpoints.abstract_tree(state))
    # The older step is untouched and still reads.
    restored, data_state = ckpt.restore(
        1, abstract_state=checkpoints.abstract_tree(state))
  assert data_state == {"index": 1}
  assert_trees_equal(restored, state)


def test_restore_newest_intact_sets_damaged_steps_aside(tmp_path):
  states = [make_state(seed) for seed in range(3)]
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    for step, state in enumerate(states, start=1):
      ckpt.save(step, state, {"index": step})
  damage(tmp_path / "3", "truncated")
  damage(tmp_path / "2", "flipped")
  lines = []
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    restored, data_state = ckpt.restore_newest_intact(
        abstract_state=checkpoints.abstract_tree(states[0]),
        report=lines.append)
    assert data_state == {"index": 1}
    assert_trees_equal(restored, states[0])
    assert ckpt.all_steps() == [1]
    # The run saves those steps again when it gets there.
    assert ckpt.save(2, states[1], {"index": 2})
  damaged = tmp_path / checkpoints.DAMAGED_SUBDIR
  assert len(lines) == 2 and all("\n" not in line for line in lines)
  assert lines[0].startswith(f"damaged checkpoint {tmp_path / '3'}: state/")
  assert lines[0].endswith(f"skipping step 3 (moved to {damaged / '3'})")
  assert f"damaged checkpoint {tmp_path / '2'}: state/" in lines[1]
  assert sorted(os.listdir(damaged)) == ["2", "3"]
  assert checkpoints.list_steps(tmp_path) == [1, 2]
  assert_trees_equal(checkpoints.load_params(tmp_path), states[1].params)

  # Nothing intact at all: None, and every step is set aside.
  damage(tmp_path / "1", "deleted")
  damage(tmp_path / "2", "deleted")
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.restore_newest_intact(
        abstract_state=checkpoints.abstract_tree(states[0]),
        report=lines.append) is None
    assert ckpt.all_steps() == []
  assert sorted(os.listdir(damaged)) == ["1", "2", "2.1", "3"]


def test_non_finite_parameters_are_refused(tmp_path):
  state = make_state()
  bad = state.replace(params={**state.params,
                              "bias": state.params["bias"].at[2].set(np.inf)})
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, bad, {"index": 1})
    ckpt.wait()
    with pytest.raises(checkpoints.DamagedCheckpointError,
                       match=r"1: state\.params\['bias'\]: holds NaN or Inf"):
      ckpt.restore(abstract_state=checkpoints.abstract_tree(state))
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r"state/params\['bias'\]: holds NaN or Inf"):
    checkpoints.load_params(tmp_path)


def test_steps_from_before_manifests_are_checked_for_nan_only(tmp_path,
                                                             caplog):
  state = make_state()
  nan = state.replace(params={**state.params,
                              "bias": state.params["bias"] * np.nan})
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {"index": 1})
    ckpt.save(2, nan, {"index": 2})
  # What a t5align without manifests wrote: the same steps without the file.
  for step in (1, 2):
    os.remove(tmp_path / str(step) / checkpoints.MANIFEST)
  assert not checkpoints.verify_step(tmp_path, 1)
  with caplog.at_level("WARNING"):
    assert_trees_equal(checkpoints.load_params(tmp_path, 1), state.params)
  assert f"{tmp_path / '1'} has no {checkpoints.MANIFEST}" in caplog.text
  with pytest.raises(checkpoints.DamagedCheckpointError, match="NaN or Inf"):
    checkpoints.load_params(tmp_path, 2)
  lines = []
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    restored, _ = ckpt.restore_newest_intact(
        abstract_state=checkpoints.abstract_tree(state), report=lines.append)
    assert_trees_equal(restored, state)
    ckpt.save(3, state, {"index": 3})
  assert "2: state.params['bias']: holds NaN or Inf" in lines[0]
  assert "checked for NaN/Inf only" in lines[1]
  # A step without a manifest after one with a manifest is an incomplete save.
  with checkpoints.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(4, state, {"index": 4})
  os.remove(tmp_path / "4" / checkpoints.MANIFEST)
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match="missing although step 3 has one"):
    checkpoints.verify_step(tmp_path, 4)
