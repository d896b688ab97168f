"""End-to-end stages on the miniature world at tiny sizes.

The central claims tested here: online, offline and replay runs go through the
same step function, and replaying an online run's recorded stream in order
(the paper's App. F sanity check) reproduces the online run bitwise; a run
killed with SIGKILL and restarted ends with exactly the parameters of an
uninterrupted run, and its recorded stream has no missing or duplicated batch.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from t5align.data import mini_world
from t5align.data import vocab
from t5align.data import writers
from t5align.models import t5
from t5align.train import checkpoints
from t5align.train import pair_sources
from t5align.train import stages
from t5align.train import steps

CFG = t5.T5Config(vocab_size=320, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=32,
                  num_encoder_layers=1, num_decoder_layers=1, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, dtype="float32")
# Prompts (at most 26 tokens with EOS) get 32; the PM's serialised pairs 72.
LENGTHS = stages.FeatureLengths(inputs=32, targets=16, pm_inputs=72)
COMMON = dict(feature_lengths=LENGTHS, partitioning_config=stages.Partitioning(data=1),
              checkpointing=stages.Checkpointing(every_steps=2, keep=100))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """D_initial, an SFT policy and a PM, each trained for a few steps."""
  d = tmp_path_factory.mktemp("mini")
  w = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=64, num_validation=16))
  writers.write_examples(str(d / "train.tfrecord"), w.d_initial("train"))
  writers.write_examples(str(d / "val.tfrecord"), w.d_initial("validation"))
  stages.sft(run_dir=str(d / "sft"), model_config=CFG, train_data=str(d / "train.tfrecord"),
             batch_size=8, train_steps=3, optimizer=stages.Optimizer(learning_rate=1e-2), **COMMON)
  stages.preference(run_dir=str(d / "pm"), model_config=CFG, train_data=str(d / "train.tfrecord"),
                    validation_data=str(d / "val.tfrecord"), batch_size=8, train_steps=2,
                    optimizer=stages.Optimizer(learning_rate=1e-2), init_checkpoint=str(d / "sft"),
                    **COMMON)
  return d


def _final_params(run_dir):
  return checkpoints.load_params(os.path.join(run_dir, stages.CHECKPOINT_SUBDIR))


def _assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sft_and_pm_runs_write_checkpoints_and_pick_best(world):
  assert checkpoints.list_steps(world / "sft" / "checkpoints") == [2, 3]
  best = (world / "pm" / "best_checkpoint.json").read_text()
  assert '"step"' in best and "validation_accuracy" in best
  lines = (world / "sft" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3


def test_relabel_writes_decision_rule_labels(world):
  out = world / "golden.tfrecord"
  summary = stages.relabel(pm_run=str(world / "pm"), pm_config=CFG,
                           input_data=str(world / "train.tfrecord"), output_data=str(out),
                           source_name="golden_pm", batch_size=16, feature_lengths=LENGTHS)
  relabelled = writers.read_examples(str(out))
  original = writers.read_examples(str(world / "train.tfrecord"))
  assert summary["pairs"] == len(original) == len(relabelled)
  assert all(r.label in (0.0, 0.5, 1.0) and r.source == "golden_pm" for r in relabelled)
  assert [r.prompt for r in relabelled] == [o.prompt for o in original]
  assert stages.relabel(pm_run=str(world / "pm"), pm_config=CFG,
                        input_data=str(world / "train.tfrecord"), output_data=str(out),
                        source_name="golden_pm", feature_lengths=LENGTHS) == {"skipped": True}


def test_preference_models_read_pairs_at_their_own_input_length(world, monkeypatch):
  """Prompts are 32 wide, but relabelling serialises pairs at pm_inputs (72)."""
  widths = []
  real = stages.preference_margins

  def spy(*args, pm_input_length, **kwargs):
    widths.append((args[3].shape[1], pm_input_length))
    return real(*args, pm_input_length=pm_input_length, **kwargs)

  monkeypatch.setattr(stages, "preference_margins", spy)
  stages.relabel(pm_run=str(world / "pm"), pm_config=CFG,
                 input_data=str(world / "train.tfrecord"), output_data=str(world / "w.tfrecord"),
                 source_name="golden_pm", feature_lengths=LENGTHS)
  assert widths == [(32, 72)]
  # Two 15-token responses and the markers do not fit in 32 tokens: without
  # pm_inputs the same lengths are rejected, naming the PM input length.
  with pytest.raises(ValueError, match="inputs length 32"):
    stages.pair_format(vocab.get_vocabulary(), dataclasses.replace(LENGTHS, pm_inputs=0))
  with pytest.raises(ValueError, match="pm_inputs must be >= 0"):
    stages.FeatureLengths(pm_inputs=-1)


def test_every_pair_source_uses_the_one_align_step(world, monkeypatch):
  calls = []
  real = steps.make_align_step

  def spy(*args, **kwargs):
    calls.append(args[2])
    return real(*args, **kwargs)

  monkeypatch.setattr(steps, "make_align_step", spy)
  data = str(world / "train.tfrecord")
  loss = steps.AlignLoss(name="dpo", beta=0.5)
  kw = dict(policy_config=CFG, sft_checkpoint=str(world / "sft"), batch_size=4, train_steps=2,
            loss=loss, train_data=data, **COMMON)
  stages.align(run_dir=str(world / "spy_online"), pair_source="online", pm_run=str(world / "pm"),
               pm_config=CFG, **kw)
  stages.align(run_dir=str(world / "spy_offline"), pair_source="offline", **kw)
  stages.align(run_dir=str(world / "spy_replay"), pair_source="replay",
               replay_stream=str(world / "spy_online" / "stream"),
               **{k: v for k, v in kw.items() if k != "train_data"})
  assert calls == [loss, loss, loss]


def test_ordered_replay_of_an_online_stream_reproduces_the_online_run(world):
  kw = dict(policy_config=CFG, sft_checkpoint=str(world / "sft"), batch_size=4, train_steps=4,
            optimizer=stages.Optimizer(learning_rate=1e-3), **COMMON)
  stages.align(run_dir=str(world / "online"), pair_source="online", pm_run=str(world / "pm"),
               pm_config=CFG, train_data=str(world / "train.tfrecord"), **kw)
  stream = list(writers.read_stream(str(world / "online" / "stream")))
  assert [step for step, _ in stream] == [0, 1, 2, 3]
  stages.align(run_dir=str(world / "replay"), pair_source="replay", replay_order="ordered",
               replay_stream=str(world / "online" / "stream"), **kw)
  online, replay = _final_params(str(world / "online")), _final_params(str(world / "replay"))
  _assert_trees_equal(online, replay)
  sft = stages.load_params(str(world / "sft"), CFG)
  assert not np.array_equal(jax.tree.leaves(online)[0], jax.tree.leaves(sft)[0])
  stages.align(run_dir=str(world / "shuffled"), pair_source="replay", replay_order="shuffled",
               replay_stream=str(world / "online" / "stream"), seed=3, **kw)
  shuffled = _final_params(str(world / "shuffled"))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(online),
                                                       jax.tree.leaves(shuffled)))


_ONLINE_SCRIPT = textwrap.dedent("""
    import os, sys
    from t5align.models import t5
    from t5align.train import stages
    d = {world!r}
    cfg = t5.T5Config(**{config!r})
    stages.align(run_dir=sys.argv[1], policy_config=cfg, sft_checkpoint=os.path.join(d, 'sft'),
                 batch_size=4, train_steps=6, pair_source='online', pm_run=os.path.join(d, 'pm'),
                 pm_config=cfg, train_data=os.path.join(d, 'train.tfrecord'),
                 optimizer=stages.Optimizer(learning_rate=1e-3),
                 feature_lengths=stages.FeatureLengths(inputs={inputs}, targets={targets},
                                                       pm_inputs={pm_inputs}),
                 partitioning_config=stages.Partitioning(data=1),
                 checkpointing=stages.Checkpointing(every_steps=2, keep=100))
""")


@pytest.mark.slow
def test_online_run_killed_with_sigkill_resumes_bitwise(world, tmp_path):
  script = tmp_path / "online.py"
  script.write_text(_ONLINE_SCRIPT.format(world=str(world), config=dataclasses.asdict(CFG),
                                          inputs=LENGTHS.inputs, targets=LENGTHS.targets,
                                          pm_inputs=LENGTHS.pm_inputs))
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  reference = tmp_path / "reference"
  subprocess.run([sys.executable, str(script), str(reference)], check=True, env=env,
                 capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # Kill as soon as the first checkpoint (step 2) is final: mid-run, with stream
  # batches recorded after that checkpoint that the restart must redo.
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if (killed / "checkpoints").exists() and checkpoints.list_steps(killed / "checkpoints"):
      break
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  done = checkpoints.list_steps(killed / "checkpoints")
  assert done and done[-1] < 6, f"not killed mid-run: checkpoints {done}"
  subprocess.run([sys.executable, str(script), str(killed)], check=True, env=env,
                 capture_output=True)
  _assert_trees_equal(_final_params(str(reference)), _final_params(str(killed)))
  ref_stream = list(writers.read_stream(str(reference / "stream")))
  got_stream = list(writers.read_stream(str(killed / "stream")))
  assert [s for s, _ in got_stream] == list(range(6))
  for (_, a), (_, b) in zip(ref_stream, got_stream):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  metric_steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert len(metric_steps) == 6


def test_sample_stage_writes_responses_per_prompt(world):
  out = world / "samples.jsonl"
  n = stages.sample(checkpoint=str(world / "sft"), model_config=CFG,
                    prompts_data=str(world / "val.tfrecord"), output_data=str(out), num_samples=2,
                    batch_size=4, feature_lengths=LENGTHS,
                    partitioning_config=stages.Partitioning(data=1))
  import json  # pylint: disable=g-import-not-at-top
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  prompts = list(dict.fromkeys(e.prompt for e in writers.read_examples(str(world / "val.tfrecord"))))
  assert n == len(rows) == 2 * len(prompts)
  assert [r["prompt"] for r in rows[::2]] == prompts
  assert all(r["sample"] in (0, 1) and len(r["tokens"]) <= LENGTHS.targets for r in rows)
  assert all(1 not in r["tokens"] and 0 not in r["tokens"] for r in rows)


def test_pair_files_prefer_their_exact_token_side_file(world, tmp_path):
  from t5align.data import vocab  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "pairs.tfrecord")
  examples = writers.read_examples(str(world / "val.tfrecord"))[:3]
  writers.write_examples(path, examples)
  vocabulary = vocab.get_vocabulary()
  from_text = stages._tokenized(path, vocabulary, LENGTHS)  # pylint: disable=protected-access
  side = {k: v.copy() for k, v in from_text.items()}
  side["response_a"][:, 0] = 7  # tokens the text would not give back
  np.savez(writers.tokens_path(path), **side)
  got = stages._tokenized(path, vocabulary, LENGTHS)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got["response_a"], side["response_a"])
  np.testing.assert_array_equal(got["prompt"], from_text["prompt"])
  too_wide = dict(side, prompt=np.zeros((3, LENGTHS.inputs + 1), np.int32))
  np.savez(writers.tokens_path(path), **too_wide)
  with pytest.raises(ValueError, match="prompt"):
    stages._tokenized(path, vocabulary, LENGTHS)  # pylint: disable=protected-access


def test_inference_stages_give_one_device_results_when_sharded(world, tmp_path):
  """Relabel and sample with the PM / policy sharded fsdp over a 4 x 2 mesh (8 fake devices)."""
  one_device = stages.Partitioning(data=1)
  fsdp = stages.Partitioning(rules="fsdp", data=4, model=2)
  labels = {}
  for name, part in (("one", one_device), ("fsdp", fsdp)):
    out = str(tmp_path / f"relabel_{name}.tfrecord")
    stages.relabel(pm_run=str(world / "pm"), pm_config=CFG, input_data=str(world / "train.tfrecord"),
                   output_data=out, source_name="golden_pm", batch_size=16,
                   feature_lengths=LENGTHS, partitioning_config=part)
    labels[name] = [e.label for e in writers.read_examples(out)]
  assert labels["fsdp"] == labels["one"]
  assert 0 < np.mean(np.asarray(labels["one"]) == 1.0) < 1  # a PM that really decides both ways

  samples = {}
  for name, part in (("one", one_device), ("fsdp", fsdp)):
    out = tmp_path / f"samples_{name}.jsonl"
    stages.sample(checkpoint=str(world / "sft"), model_config=CFG,
                  prompts_data=str(world / "val.tfrecord"), output_data=str(out), num_samples=2,
                  batch_size=4, feature_lengths=LENGTHS, partitioning_config=part)
    samples[name] = out.read_text()
  assert samples["fsdp"] == samples["one"]
  # Rows of a batch must divide over the 'data' axis, with an error that says so.
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the mesh 'data' axis"):
    stages.sample(checkpoint=str(world / "sft"), model_config=CFG,
                  prompts_data=str(world / "val.tfrecord"), output_data=str(tmp_path / "x.jsonl"),
                  batch_size=6, feature_lengths=LENGTHS, partitioning_config=fsdp)


def _tokens(path):
  return stages._tokenized(path, vocab.get_vocabulary(), LENGTHS)  # pylint: disable=protected-access


def _spy_sft_data(monkeypatch, *, train=True):
  """The arrays ``stages.sft`` hands to its data source; with ``train=False`` it stops there."""
  seen = []
  real = pair_sources.EpochBatches

  def spy(arrays, **kwargs):
    seen.append(arrays)
    return real(arrays, **kwargs)

  monkeypatch.setattr(pair_sources, "EpochBatches", spy)
  if not train:
    monkeypatch.setattr(stages, "_run", lambda **kwargs: None)
  return seen


def test_sft_trains_on_the_pool_of_several_files(world, tmp_path, monkeypatch, capsys):
  """The paper's pooled SFT set (App. C): both responses of every pair of every file."""
  seen = _spy_sft_data(monkeypatch)
  train, val = str(world / "train.tfrecord"), str(world / "val.tfrecord")
  run = tmp_path / "pooled"
  stages.sft(run_dir=str(run), model_config=CFG, train_data=[train, val], batch_size=8,
             train_steps=1, optimizer=stages.Optimizer(learning_rate=1e-2), **COMMON)
  out = capsys.readouterr().out
  assert f"sft: 128 targets (64 pairs) from {train}" in out
  assert f"sft: 32 targets (16 pairs) from {val}" in out
  assert "sft: 160 targets pooled from 2 files" in out
  a, b = _tokens(train), _tokens(val)
  (data,) = seen
  np.testing.assert_array_equal(data["inputs"], np.concatenate([a["prompt"], b["prompt"]] * 2))
  np.testing.assert_array_equal(data["targets"], np.concatenate(
      [a["response_a"], b["response_a"], a["response_b"], b["response_b"]]))
  assert checkpoints.list_steps(run / "checkpoints") == [1]


def test_sft_on_one_file_keeps_its_data_and_order(world, monkeypatch):
  seen = _spy_sft_data(monkeypatch, train=False)
  train = str(world / "train.tfrecord")
  kw = dict(run_dir=str(world / "unused"), model_config=CFG, batch_size=8, train_steps=1, **COMMON)
  stages.sft(train_data=train, **kw)
  stages.sft(train_data=[train], **kw)
  arrays = _tokens(train)
  for data in seen:
    np.testing.assert_array_equal(data["inputs"], np.concatenate([arrays["prompt"]] * 2))
    np.testing.assert_array_equal(data["targets"], np.concatenate([arrays["response_a"],
                                                                   arrays["response_b"]]))
  monkeypatch.undo()
  batches = [pair_sources.EpochBatches(data, batch_size=8, seed=0).next_batch(None)
             for data in seen]
  _assert_trees_equal(*batches)


def test_sft_pool_pads_a_narrower_side_file(world, tmp_path):
  path = str(tmp_path / "pairs.tfrecord")
  writers.write_examples(path, writers.read_examples(str(world / "val.tfrecord"))[:3])
  narrow = {k: v[:, :8] if v.ndim == 2 else v for k, v in _tokens(path).items()}
  np.savez(writers.tokens_path(path), **narrow)
  pool = stages.sft_pool([str(world / "val.tfrecord"), path], vocab.get_vocabulary(), LENGTHS)
  assert pool["inputs"].shape == (2 * 19, LENGTHS.inputs)
  assert pool["targets"].shape == (2 * 19, LENGTHS.targets)
  np.testing.assert_array_equal(pool["targets"][16:19, 8:], 0)
  np.testing.assert_array_equal(pool["targets"][16:19, :8], narrow["response_a"])


def test_sft_names_a_missing_or_empty_file_of_the_pool(world, tmp_path):
  kw = dict(run_dir=str(tmp_path / "sft"), model_config=CFG, batch_size=8, train_steps=1, **COMMON)
  train, missing = str(world / "train.tfrecord"), str(tmp_path / "missing.tfrecord")
  with pytest.raises(FileNotFoundError, match=r"file 2 of 2, .*missing\.tfrecord: no such file"):
    stages.sft(train_data=[train, missing], **kw)
  empty = str(tmp_path / "empty.tfrecord")
  writers.write_examples(empty, [])
  with pytest.raises(ValueError, match=r"empty\.tfrecord: the dataset is empty"):
    stages.sft(train_data=[empty, train], **kw)
  with pytest.raises(ValueError, match="non-empty list"):
    stages.sft(train_data=[], **kw)
  assert not (tmp_path / "sft").exists()
