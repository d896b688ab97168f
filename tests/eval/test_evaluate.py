"""Tests of t5align.eval.evaluate on tiny random T5 models and real Orbax checkpoints.

One module-scoped evaluation of a run with three checkpoints (the SFT policy,
another policy, the golden policy) feeds most tests; each quantity is checked
against an independent computation: the KL with a numpy softmax, the win rate
by re-judging the saved samples, accuracy and drift with
``steps.response_logprobs``.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5align.eval import evaluate
from t5align.models import preference
from t5align.models import t5
from t5align.train import checkpoints
from t5align.train import state as state_lib
from t5align.train import steps as steps_lib

CONFIG = t5.T5Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                     num_encoder_layers=1, num_decoder_layers=1, dtype="float32")
FMT = preference.PairFormat(response_1_marker=(60,), response_2_marker=(61,), first_token=62,
                            second_token=63)
LENGTH = 4           # max_decode_length
PROMPT_LEN = 6
PM_LEN = PROMPT_LEN + 2 * LENGTH + 3
NUM_PROMPTS = 512    # all of them are win-rate prompts
NUM_KL = 40          # not a multiple of BATCH: exercises the filled-up last batch
NUM_PAIRS = 40       # all of them are classification pairs
BATCH = 64
SFT_STEP, OTHER_STEP, GOLDEN_STEP = 100, 200, 300


def random_tokens(rng, rows, width, eos=True):
  """Left-aligned rows of ids in [2, 60) with random lengths, optionally ending in EOS."""
  out = np.zeros((rows, width), np.int32)
  for i in range(rows):
    n = rng.integers(1, width + 1)
    out[i, :n] = rng.integers(2, 60, size=n)
    if eos:
      out[i, n - 1] = t5.EOS_ID
  return out


def make_pairs(rng, rows):
  labels = rng.choice([1.0, 0.0, 0.7], size=rows)  # hard labels both ways, and a soft one
  return {"prompt": random_tokens(rng, rows, PROMPT_LEN, eos=False),
          "chosen": random_tokens(rng, rows, 5), "rejected": random_tokens(rng, rows, 5),
          "label": labels}


def save_checkpoints(directory, params_by_step):
  with checkpoints.Checkpointer(directory, keep=10, save_interval_steps=1,
                                async_save=False) as ckpt:
    for step, params in params_by_step.items():
      state = state_lib.TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(0))
      ckpt.save(step, state, {"index": step}, force=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  sft = t5.init_params(CONFIG, jax.random.key(0))
  # Another policy near SFT: a KL that is positive but not huge.
  other = jax.tree.map(lambda p, q: p + 0.3 * q, sft, t5.init_params(CONFIG, jax.random.key(1)))
  golden = t5.init_params(CONFIG, jax.random.key(2))
  pm = t5.init_params(CONFIG, jax.random.key(3))
  rng = np.random.default_rng(0)
  prompts = random_tokens(rng, NUM_PROMPTS, PROMPT_LEN, eos=False)
  d_golden, online = make_pairs(rng, NUM_PAIRS), make_pairs(rng, NUM_PAIRS - 7)
  run_dir = str(tmp_path_factory.mktemp("run"))
  save_checkpoints(os.path.join(run_dir, "checkpoints"),
                   {SFT_STEP: sft, OTHER_STEP: other, GOLDEN_STEP: golden})
  kwargs = dict(policy_config=CONFIG, sft_params=sft, golden_policy_params=golden,
                golden_pm_params=pm, golden_pm_config=CONFIG, pair_format=FMT, prompts=prompts,
                d_golden_pairs=d_golden, online_stream_pairs=online, num_kl_prompts=NUM_KL,
                num_winrate_prompts=NUM_PROMPTS, num_classification_pairs=NUM_PAIRS,
                max_decode_length=LENGTH, pm_input_length=PM_LEN, batch_size=BATCH, seed=0)
  lines = []
  rows = evaluate.evaluate_run(run_dir=run_dir, include_sft=True, save_samples=True,
                               progress=lines.append, **kwargs)
  return dict(params={"sft": sft, "other": other, "golden": golden, "pm": pm}, prompts=prompts,
              d_golden=d_golden, online=online, run_dir=run_dir, kwargs=kwargs, rows=rows,
              lines=lines, by_step={r["step"]: r for r in rows},
              paths=evaluate.output_paths(os.path.join(run_dir, "eval", "eval.jsonl")))


def samples_of(world, step):
  with np.load(os.path.join(world["paths"]["samples"], f"step_{step}.npz")) as data:
    return dict(data)


def test_rows_files_and_progress(world):
  assert [r["step"] for r in world["rows"]] == [0, SFT_STEP, OTHER_STEP, GOLDEN_STEP]
  assert world["by_step"][0]["checkpoint"] == evaluate.SFT_CHECKPOINT
  with open(world["paths"]["jsonl"]) as f:
    assert [json.loads(line) for line in f] == world["rows"]
  with open(world["paths"]["csv"]) as f:
    lines = f.read().splitlines()
  assert len(lines) == 5 and lines[0].startswith("step,checkpoint,kl,log_kl")
  assert not os.path.exists(world["paths"]["errors"])
  row = world["by_step"][OTHER_STEP]
  assert (row["num_kl_prompts"], row["num_winrate_prompts"], row["num_classification_pairs"],
          row["num_online_pairs"]) == (NUM_KL, NUM_PROMPTS, NUM_PAIRS, NUM_PAIRS - 7)
  assert any(f"win rate on {NUM_PROMPTS} prompts" in line for line in world["lines"])
  assert any("[4/4]" in line and "kl=" in line for line in world["lines"])


@pytest.mark.parametrize("step", [0, SFT_STEP])
def test_sft_policy_has_zero_kl_zero_drift_and_chance_accuracy(world, step):
  row = world["by_step"][step]
  assert row["kl"] == 0.0 and row["log_kl"] is None and row["kl_stderr"] == 0.0
  assert row["drift_winner"] == 0.0 and row["drift_loser"] == 0.0
  # f == 0 on every pair: each prediction is a tie, worth 1/2 against any label.
  assert row["accuracy_d_golden"] == 0.5 and row["accuracy_online"] == 0.5


@jax.jit
def _logits(params, prompts, targets):
  return t5.Transformer(CONFIG).apply({"params": params}, prompts, t5.shift_right(targets),
                                      targets)


@jax.jit
def _response_logprobs(params, prompts, responses):
  return steps_lib.response_logprobs(params, CONFIG, prompts, responses, reduction="sum")


@jax.jit
def _judge(pm_params, prompts, first, second):
  """r(x, first, second) of the golden PM, one order only."""
  inputs = preference.serialize_pair(prompts, first, second, FMT, PM_LEN)
  return jax.nn.sigmoid(preference.pair_score(pm_params, CONFIG, FMT, inputs))


def numpy_kl(params_p, params_q, prompts, samples):
  """Sum over non-pad sample positions of KL(p || q) of the next-token softmaxes, numpy."""
  def log_softmax(params):
    logits = np.asarray(_logits(params, jnp.asarray(prompts), jnp.asarray(samples)), np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
  log_p, log_q = log_softmax(params_p), log_softmax(params_q)
  per_position = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
  return (per_position * (samples != 0)).sum(axis=-1)


def test_kl_equals_brute_force_for_another_policy(world):
  row, saved = world["by_step"][OTHER_STEP], samples_of(world, OTHER_STEP)
  indices = saved["kl_prompt_indices"]
  assert len(indices) == NUM_KL == len(set(indices.tolist()))
  samples = saved["kl_samples"]
  # One real sample per prompt: non-empty, nothing after EOS.
  assert samples.shape == (NUM_KL, LENGTH) and np.all(samples[:, 0] != 0)
  expected = numpy_kl(world["params"]["other"], world["params"]["sft"],
                      world["prompts"][indices], samples)
  assert row["kl"] > 0.01
  np.testing.assert_allclose(row["kl"], expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(row["log_kl"], math.log(expected.mean()), rtol=1e-5)
  np.testing.assert_allclose(row["kl_stderr"], expected.std() / math.sqrt(NUM_KL), rtol=1e-4)
  # Same prompts (and same draws: the SFT samples are a different policy's) for every checkpoint.
  np.testing.assert_array_equal(samples_of(world, SFT_STEP)["kl_prompt_indices"], indices)


def test_win_rate_equals_rejudging_the_saved_samples(world):
  for step in (OTHER_STEP, GOLDEN_STEP):
    row, saved = world["by_step"][step], samples_of(world, step)
    prompts = world["prompts"][saved["winrate_prompt_indices"]]
    y, y_golden = saved["policy_samples"], saved["golden_samples"]
    pm_params = world["params"]["pm"]

    def r(first, second):
      return np.asarray(_judge(pm_params, prompts, first, second))
    margin = r(y, y_golden) - r(y_golden, y)
    wins = np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5))
    np.testing.assert_allclose(row["win_rate"], wins.mean(), atol=1e-9)
    np.testing.assert_allclose(row["win_rate_stderr"], wins.std() / math.sqrt(NUM_PROMPTS),
                               rtol=1e-6)
    np.testing.assert_allclose(row["response_length"],
                               np.mean(np.sum(y != 0, axis=1)), rtol=1e-6)
  # The golden samples were drawn once; the policy draws use the same key at every step.
  first, second = samples_of(world, SFT_STEP), samples_of(world, OTHER_STEP)
  np.testing.assert_array_equal(first["golden_samples"], second["golden_samples"])
  np.testing.assert_array_equal(first["winrate_prompt_indices"], second["winrate_prompt_indices"])


def test_golden_policy_against_itself_wins_half(world):
  """Independent draws of one policy: margins are antisymmetric, so E[win] = 1/2 exactly.

  Each prompt's outcome has variance <= 1/4; with 512 prompts a 4-sigma band is
  4 * 0.5 / sqrt(512) = 0.088.
  """
  row = world["by_step"][GOLDEN_STEP]
  assert row["win_rate_ties"] < 0.5  # most outcomes are real wins or losses
  assert abs(row["win_rate"] - 0.5) < 4 * 0.5 / math.sqrt(NUM_PROMPTS)
  saved = samples_of(world, GOLDEN_STEP)
  assert not np.array_equal(saved["policy_samples"], saved["golden_samples"])


@pytest.mark.parametrize("name", ["d_golden", "online"])
def test_accuracy_and_drift_by_hand(world, name):
  row, pairs = world["by_step"][OTHER_STEP], world[name]

  def logp(params, responses):
    return np.asarray(_response_logprobs(params, pairs["prompt"], responses), np.float64)
  other, sft = world["params"]["other"], world["params"]["sft"]
  d_chosen = logp(other, pairs["chosen"]) - logp(sft, pairs["chosen"])
  d_rejected = logp(other, pairs["rejected"]) - logp(sft, pairs["rejected"])
  correct = []
  for f, label in zip(d_chosen - d_rejected, pairs["label"]):
    # Identical responses (both just EOS) give f == 0 exactly: a tie, worth 1/2.
    predicted = 1.0 if f > 0 else 0.0 if f < 0 else 0.5
    correct.append(label * predicted + (1 - label) * (1 - predicted))
  np.testing.assert_allclose(row[f"accuracy_{name}"], np.mean(correct), atol=1e-9)
  if name == "d_golden":
    winner = np.where(pairs["label"] >= 0.5, d_chosen, d_rejected)
    loser = np.where(pairs["label"] >= 0.5, d_rejected, d_chosen)
    assert abs(row["drift_winner"]) > 1e-3
    np.testing.assert_allclose(row["drift_winner"], winner.mean(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(row["drift_loser"], loser.mean(), rtol=1e-4, atol=1e-4)


def test_rerun_skips_evaluated_steps_and_picks_up_new_ones(world, monkeypatch):
  loads = []
  real_load = checkpoints.load_params
  monkeypatch.setattr(evaluate.checkpoints_lib, "load_params",
                      lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
  lines = []
  rows = evaluate.evaluate_run(run_dir=world["run_dir"], include_sft=True, progress=lines.append,
                               **world["kwargs"])
  assert loads == [] and rows == world["rows"]
  assert any("evaluating 0" in line for line in lines)
  # A step that finished after the first evaluation: only it is evaluated.
  save_checkpoints(os.path.join(world["run_dir"], "checkpoints"),
                   {400: world["params"]["other"]})
  rows = evaluate.evaluate_run(run_dir=world["run_dir"], include_sft=True, progress=lines.append,
                               **world["kwargs"])
  assert loads == [400]
  assert [r["step"] for r in rows] == [0, SFT_STEP, OTHER_STEP, GOLDEN_STEP, 400]
  # Same params, same keys: the same numbers as step 200.
  for field in ("kl", "win_rate", "accuracy_d_golden", "drift_winner"):
    assert rows[-1][field] == world["by_step"][OTHER_STEP][field]


def test_rerun_with_other_settings_is_refused(world):
  kwargs = dict(world["kwargs"], seed=1)
  with pytest.raises(ValueError, match="seed=0.*uses 1.*another output_path"):
    evaluate.evaluate_run(run_dir=world["run_dir"], progress=lambda _: None, **kwargs)


def test_corrupt_and_incompatible_checkpoints_are_reported_and_skipped(world, tmp_path):
  directory = str(tmp_path / "ckpts")
  wide = t5.init_params(t5.T5Config(**{**CONFIG.__dict__, "emb_dim": 24}), jax.random.key(5))
  save_checkpoints(directory, {10: world["params"]["other"], 20: world["params"]["other"],
                               25: world["params"]["other"], 30: wide})
  # Flip bytes in the middle of step 25's largest array data file: it must not be evaluated.
  data = max((os.path.join(root, name) for root, _, names in
              os.walk(os.path.join(directory, "25", "state")) for name in names
              if os.path.basename(root) == "d"), key=os.path.getsize)
  with open(data, "r+b") as f:
    f.seek(os.path.getsize(data) // 2)
    f.write(b"\xff" * 64)
  # Corrupt step 20: delete its array data, keep the directory (still listed as finalized).
  state_dir = os.path.join(directory, "20", "state")
  deleted = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      if not name.startswith("_"):
        os.remove(os.path.join(root, name))
        deleted += 1
  assert deleted and checkpoints.list_steps(directory) == [10, 20, 25, 30]
  lines = []
  output = str(tmp_path / "out" / "eval.jsonl")
  rows = evaluate.evaluate_run(checkpoint_dir=directory, output_path=output,
                               progress=lines.append, **world["kwargs"])
  assert [r["step"] for r in rows] == [10]
  with open(evaluate.output_paths(output)["errors"]) as f:
    errors = [json.loads(line) for line in f]
  assert [e["step"] for e in errors] == [20, 25, 30]
  assert errors[0]["checkpoint"] == os.path.join(directory, "20")
  for error, step in zip(errors[:2], (20, 25)):
    assert error["error"].startswith(
        f"DamagedCheckpointError: damaged checkpoint {os.path.join(directory, str(step))}: state/")
  assert os.path.relpath(data, os.path.join(directory, "25")) in errors[1]["error"]
  # The first parameter in name order that differs: the decoder's final norm scale.
  assert "decoder/decoder_norm/scale has shape (24,)" in errors[2]["error"]
  assert "expects (16,)" in errors[2]["error"]
  error_lines = [line for line in lines if "ERROR" in line]
  assert len(error_lines) == 3
  assert "eval step 20 " in error_lines[0] and os.path.join(directory, "20") in error_lines[0]
  assert any("steps [20, 25, 30]" in line for line in lines)


def test_bad_inputs_raise_clear_errors(world, tmp_path):
  kwargs = dict(world["kwargs"])
  bad_pairs = dict(world["d_golden"], label=np.full(NUM_PAIRS, 1.5))
  with pytest.raises(ValueError, match=r"d_golden_pairs\['label'\] row 0"):
    evaluate.evaluate_run(run_dir=world["run_dir"], **{**kwargs, "d_golden_pairs": bad_pairs})
  with pytest.raises(ValueError, match="output_path is required"):
    evaluate.evaluate_run(checkpoint_dir=str(tmp_path), **kwargs)
  with pytest.raises(FileNotFoundError, match=r"steps \[7\]"):
    evaluate.evaluate_run(run_dir=world["run_dir"], steps=[7], output_path=str(tmp_path / "x"),
                          **kwargs)
  with pytest.raises(ValueError, match="sft_params: parameter"):
    evaluate.evaluate_run(run_dir=world["run_dir"],
                          **{**kwargs, "sft_params": {"token_embedder": {}}})


def test_sharded_evaluation_matches_one_device(world, tmp_path):
  """Every model placed fsdp over a 4 x 2 mesh: the rows and samples of one device."""
  from t5align import partitioning  # pylint: disable=g-import-not-at-top
  placement = partitioning.Placement.create(rules="fsdp", data=4, model=2)
  output = str(tmp_path / "sharded.jsonl")
  (row,) = evaluate.evaluate_run(run_dir=world["run_dir"], steps=[OTHER_STEP], output_path=output,
                                 save_samples=True, placement=placement, progress=lambda _: None,
                                 **world["kwargs"])
  want = world["by_step"][OTHER_STEP]
  for field in ("win_rate", "win_rate_ties", "response_length", "accuracy_d_golden",
                "accuracy_online", "num_kl_prompts", "num_winrate_prompts"):
    assert row[field] == want[field], field
  for field in ("kl", "drift_winner", "drift_loser"):
    assert row[field] == pytest.approx(want[field], rel=1e-5, abs=1e-6), field
  with np.load(os.path.join(evaluate.output_paths(output)["samples"], f"step_{OTHER_STEP}.npz")) as z:
    got = dict(z)
  reference = samples_of(world, OTHER_STEP)
  for key in ("kl_samples", "policy_samples", "golden_samples", "wins"):
    np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
  np.testing.assert_allclose(got["margins"], reference["margins"], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="batch_size=62 is not divisible"):
    evaluate.evaluate_run(run_dir=world["run_dir"], output_path=str(tmp_path / "x.jsonl"),
                          placement=placement, progress=lambda _: None,
                          **{**world["kwargs"], "batch_size": 62})


def test_evaluate_stage_reads_run_files(tmp_path):
  """The ``t5align eval`` entry point on mini-world files and saved runs, at tiny sizes."""
  from t5align.data import mini_world
  from t5align.data import writers
  from t5align.train import stages
  config = t5.T5Config(**{**CONFIG.__dict__, "vocab_size": 320})
  lengths = stages.FeatureLengths(inputs=64, targets=8)
  world = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=24, num_validation=4))
  examples = world.d_initial("train")
  d_golden = str(tmp_path / "d_golden.tfrecord")
  writers.write_examples(d_golden, examples)
  runs = {name: str(tmp_path / name) for name in ("sft", "golden_policy", "golden_pm", "online")}
  for i, name in enumerate(("sft", "golden_policy", "golden_pm")):
    save_checkpoints(os.path.join(runs[name], "checkpoints"),
                     {5: t5.init_params(config, jax.random.key(10 + i))})
  save_checkpoints(os.path.join(runs["online"], "checkpoints"),
                   {2: t5.init_params(config, jax.random.key(20)),
                    4: t5.init_params(config, jax.random.key(21))})
  rng = np.random.default_rng(1)
  stream = writers.StreamWriter(os.path.join(runs["online"], "stream"))
  for step in range(3):  # 3 batches of 4 pairs; 5 of the 12 are sampled
    stream.append(step, {"prompt": rng.integers(2, 300, (4, 64), dtype=np.int32),
                         "chosen": rng.integers(2, 300, (4, 8), dtype=np.int32),
                         "rejected": rng.integers(2, 300, (4, 8), dtype=np.int32),
                         "label": np.ones(4, np.float32),
                         "ref_chosen": np.zeros(4, np.float32),
                         "ref_rejected": np.zeros(4, np.float32)})
  output_dir = str(tmp_path / "eval_online")
  rows = evaluate.evaluate_stage(
      run_dir=runs["online"], output_dir=output_dir, policy_config=config,
      sft_checkpoint=runs["sft"], golden_policy_checkpoint=runs["golden_policy"],
      golden_pm_run=runs["golden_pm"], golden_pm_config=config, d_golden=d_golden,
      feature_lengths=lengths, num_kl_prompts=6, num_winrate_prompts=8,
      num_classification_pairs=5, batch_size=8)
  assert [r["step"] for r in rows] == [0, 2, 4]
  distinct_prompts = len({e.prompt for e in examples})
  assert rows[1]["num_winrate_prompts"] == min(8, distinct_prompts)
  assert rows[1]["num_online_pairs"] == 5 and rows[1]["num_classification_pairs"] == 5
  assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and 0 <= rows[1]["accuracy_online"] <= 1
  assert os.path.exists(os.path.join(output_dir, "eval.jsonl"))
  # The sampled online pairs are rows of the stream, kept for reruns.
  with np.load(os.path.join(output_dir, evaluate.ONLINE_PAIRS_FILE)) as kept:
    prompts = kept["prompt"]
  recorded = np.concatenate([b["prompt"] for _, b in writers.read_stream(
      os.path.join(runs["online"], "stream"))])
  assert prompts.shape == (5, 64) and len({p.tobytes() for p in prompts}) == 5
  assert all(any(np.array_equal(p, r) for r in recorded) for p in prompts)

  # Online pairs are classified against the golden PM's labels (Fig. 6), not the
  # stream's own (proxy) labels, which are kept as proxy_label.
  from t5align.data import vocab as vocab_lib
  fmt = stages.pair_format(vocab_lib.get_vocabulary(None), lengths)
  golden_pm = checkpoints.load_params(os.path.join(runs["golden_pm"], "checkpoints"), 5)

  def golden_decisions(prompt, first, second):
    margin = preference.symmetric_preference(golden_pm, config, fmt, jnp.asarray(prompt),
                                             jnp.asarray(first), jnp.asarray(second),
                                             lengths.pm_input_length)["margin"]
    return np.where(np.asarray(margin) > 0, 1.0, np.where(np.asarray(margin) < 0, 0.0, 0.5))

  with np.load(os.path.join(output_dir, evaluate.ONLINE_PAIRS_FILE)) as kept:
    kept = dict(kept)
  expected = golden_decisions(kept["prompt"], kept["chosen"], kept["rejected"])
  np.testing.assert_array_equal(kept["label"], expected)
  np.testing.assert_array_equal(kept["proxy_label"], np.ones(5))
  # The proxy said "chosen" every time: it agrees with the golden PM where the label is 1.
  assert rows[1]["online_proxy_golden_agreement"] == pytest.approx(float(np.mean(expected)))
  # Along the stream: one bin per recorded step here (3 < STREAM_BINS), each of 5 pairs
  # taken from consecutive batches, scored against independent golden decisions.
  with open(os.path.join(output_dir, evaluate.STREAM_AGREEMENT_FILE)) as f:
    bins = json.load(f)["bins"]
  batches = [b for _, b in writers.read_stream(os.path.join(runs["online"], "stream"))]
  assert [b["step"] for b in bins] == [0, 1, 2]
  for entry in bins:
    start = entry["step"]
    pairs = {k: np.concatenate([b[k] for b in batches[start:]])[:5]
             for k in ("prompt", "chosen", "rejected")}
    values = golden_decisions(pairs["prompt"], pairs["chosen"], pairs["rejected"])
    assert entry["num_pairs"] == len(values)
    np.testing.assert_array_equal(entry["agreement_values"], values)
    assert entry["proxy_golden_agreement"] == pytest.approx(float(np.mean(values)))
