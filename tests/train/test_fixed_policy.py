"""Fixed-policy pair datasets (D_4k-vs-4k, D_sft-vs-800, D_800-vs-4k) on the mini world.

The policy is a tiny SFT run with checkpoints at steps 100 and 200 (trained
long enough to emit mostly whole words, so decode -> encode is meaningful);
the golden PM is a checkpoint of random parameters (any T5 parameters define a
pairwise PM, and labels only have to agree with an independent recomputation).
The datasets are built once per module and inspected by the tests.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5align.data import mini_world
from t5align.data import tasks
from t5align.data import vocab as vocab_lib
from t5align.data import writers
from t5align.models import t5
from t5align.train import checkpoints
from t5align.train import fixed_policy
from t5align.train import stages
from t5align.train import state as state_lib

CFG = t5.T5Config(vocab_size=320, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=32,
                  num_encoder_layers=1, num_decoder_layers=1, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, dtype="float32")
LENGTHS = stages.FeatureLengths(inputs=80, targets=16)


def _save_random_params(directory, seed):
  params = t5.init_params(CFG, jax.random.key(seed))
  state = state_lib.TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.key(seed))
  with checkpoints.Checkpointer(directory) as ckpt:
    ckpt.save(1, state, {}, force=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Prompts with repeats, an SFT run (steps 100 and 200), a random golden PM, a random policy."""
  d = tmp_path_factory.mktemp("fixed_policy")
  world_config = mini_world.MiniWorldConfig(num_train=64, num_validation=8)
  train = mini_world.MiniWorld(world_config).d_initial("train")
  writers.write_examples(str(d / "train.tfrecord"), train)
  # 24 distinct prompts; two repeat later (swapped, other task and id), one has its own task.
  first = [dataclasses.replace(e, task="mini_b") if i == 5 else e for i, e in enumerate(train[:24])]
  repeats = [dataclasses.replace(train[k].swapped(), task="other", example_id=f"repeat-{k}")
             for k in (3, 0)]
  writers.write_examples(str(d / "prompts.tfrecord"), first[:16] + repeats + first[16:])
  stages.sft(run_dir=str(d / "sft"), model_config=CFG, train_data=str(d / "train.tfrecord"),
             batch_size=8, train_steps=200, optimizer=stages.Optimizer(learning_rate=1e-2),
             feature_lengths=LENGTHS, partitioning_config=stages.Partitioning(data=1),
             checkpointing=stages.Checkpointing(every_steps=100, keep=10))
  _save_random_params(d / "golden" / stages.CHECKPOINT_SUBDIR, seed=7)
  _save_random_params(d / "random_policy" / stages.CHECKPOINT_SUBDIR, seed=8)
  return d, first


@pytest.fixture(scope="module")
def built(world):
  """Datasets: name -> (summary, output path)."""
  d, _ = world
  common = dict(model_config=CFG, golden_pm_run=str(d / "golden"), golden_pm_config=CFG,
                prompts_data=str(d / "prompts.tfrecord"), batch_size=16, feature_lengths=LENGTHS)
  sft = str(d / "sft")
  calls = {
      "100-vs-200": dict(policy_a=sft, step_a=100, policy_b=sft),  # b: the latest step
      "200-vs-200": dict(policy_a=sft, policy_b=os.path.join(sft, "checkpoints"), step_b=200),
      "200-vs-200-again": dict(policy_a=sft, policy_b=os.path.join(sft, "checkpoints"), step_b=200),
      "200-vs-200-seed1": dict(policy_a=sft, policy_b=sft, seed=1),
      "random-vs-200": dict(policy_a=str(d / "random_policy"), policy_b=sft),
  }
  out = {}
  for name, kw in calls.items():
    path = str(d / f"{name}.tfrecord")
    out[name] = (fixed_policy.fixed_policy_pairs(output_data=path, **common, **kw), path)
  return out


def _tokens(path):
  """(prompt, response_a, response_b, label) token rows: the side file, else re-tokenised text."""
  if os.path.exists(writers.tokens_path(path)):
    with np.load(writers.tokens_path(path)) as z:
      return z["prompt"], z["response_a"], z["response_b"], z["label"]
  arrays = tasks.tokenize_examples(writers.read_examples(path), vocab_lib.get_vocabulary(),
                                   LENGTHS.as_dict())
  return arrays["prompt"], arrays["response_a"], arrays["response_b"], arrays["label"]


def _body(row):
  ids = [int(t) for t in row if t != 0]
  return ids[:ids.index(1)] if 1 in ids else ids


@jax.jit
def _first_step_logits(params, inputs):
  ones = jnp.ones((len(inputs), 1), jnp.int32)  # decoder input: the start token 0
  return t5.Transformer(CFG).apply({"params": params}, inputs, ones * 0, ones,
                                   enable_dropout=False)[:, 0]  # [B, V]


def _reference_margins(pm_params, prompt_texts, rows_a, rows_b):
  """r(x,a,b) - r(x,b,a) with PM inputs built by hand and the network applied directly."""
  vocabulary = vocab_lib.get_vocabulary()
  fmt = tasks.pair_format(vocabulary, LENGTHS.as_dict())
  inputs = []
  for text, a, b in zip(prompt_texts, rows_a, rows_b):
    prompt = [int(t) for t in vocabulary.encode(text)]
    for first, second in ((_body(a), _body(b)), (_body(b), _body(a))):
      tail = (list(fmt.response_1_marker) + first + list(fmt.response_2_marker) + second
              + list(fmt.question) + [1])
      row = prompt[max(len(prompt) - (LENGTHS.inputs - len(tail)), 0):] + tail
      inputs.append(row + [0] * (LENGTHS.inputs - len(row)))
  inputs = jnp.asarray(inputs, jnp.int32)  # [2N, L]: (a, b) and (b, a) interleaved
  logits = _first_step_logits(pm_params, inputs)
  r = np.asarray(jax.nn.sigmoid(logits[:, fmt.target_1_id] - logits[:, fmt.target_2_id]))
  return r[0::2] - r[1::2]


def test_one_pair_per_distinct_prompt_with_provenance(world, built):
  _, first = world
  summary, path = built["100-vs-200"]
  examples = writers.read_examples(path)
  assert summary["prompts"] == 24
  assert summary["pairs"] + summary["skipped_empty"] == 24 and summary["pairs"] == len(examples)
  assert summary["pairs"] >= 20
  expected = {e.prompt: e for e in first}
  assert len({e.prompt for e in examples}) == len(examples)
  # First-seen order; task and id from the first example of the prompt, not from its repeats.
  order = [e.prompt for e in first]
  positions = [order.index(e.prompt) for e in examples]
  assert positions == sorted(positions)
  for e in examples:
    assert e.task == expected[e.prompt].task
    assert e.example_id == f"{expected[e.prompt].example_id}:sft@100-vs-sft@200"
    assert e.source == "golden_pm:sft@100-vs-sft@200" and e.step == -1
    assert e.response_a.strip() and e.response_b.strip()
  assert any(e.task == "mini_b" for e in examples)
  assert summary["output"] == path
  labels = np.asarray([e.label for e in examples])
  assert summary["ties"] == int(np.sum(labels == 0.5))
  assert summary["a_win_fraction"] == pytest.approx(np.mean(labels == 1.0))


@pytest.mark.parametrize("name", ["100-vs-200", "random-vs-200"])
def test_labels_follow_the_golden_pm_decision_rule(world, built, name):
  d, _ = world
  _, path = built[name]
  examples = writers.read_examples(path)
  labels = np.asarray([e.label for e in examples])
  assert set(labels) <= {0.0, 0.5, 1.0}
  _, rows_a, rows_b, stored = _tokens(path)
  np.testing.assert_array_equal(stored, labels)
  pm = checkpoints.load_params(d / "golden" / stages.CHECKPOINT_SUBDIR)
  margins = _reference_margins(pm, [e.prompt for e in examples], rows_a, rows_b)
  same = np.all(rows_a == rows_b, axis=1)
  expected = np.where(same, 0.5, np.where(margins > 0, 1.0, 0.0))
  decided = same | (np.abs(margins) > 1e-6)  # float noise may flip a margin of ~0
  assert decided.mean() > 0.9
  np.testing.assert_array_equal(labels[decided], expected[decided])
  assert 0.0 < np.mean(labels[~same] == 1.0) < 1.0


def test_side_file_holds_the_sampled_tokens_of_the_text(built):
  vocabulary = vocab_lib.get_vocabulary()
  summary, path = built["random-vs-200"]
  # A random policy emits arbitrary pieces, which do not survive decode -> encode.
  assert summary["tokens_file"] == writers.tokens_path(path)
  assert summary["token_exact_fraction"] < 0.9
  examples = writers.read_examples(path)
  prompt, rows_a, rows_b, _ = _tokens(path)
  retokenized = tasks.tokenize_examples(examples, vocabulary, LENGTHS.as_dict())
  np.testing.assert_array_equal(prompt, retokenized["prompt"])
  assert rows_a.shape == rows_b.shape == (len(examples), LENGTHS.targets)
  for e, a, b in zip(examples, rows_a, rows_b):
    assert vocabulary.decode(_body(a)) == e.response_a
    assert vocabulary.decode(_body(b)) == e.response_b
  exact = np.concatenate([np.all(retokenized["response_a"] == rows_a, axis=1),
                          np.all(retokenized["response_b"] == rows_b, axis=1)])
  assert summary["token_exact_fraction"] == pytest.approx(exact.mean())


def test_decode_encode_of_sft_samples_is_almost_always_exact(built):
  vocabulary = vocab_lib.get_vocabulary()
  ids = []
  for name in ("100-vs-200", "200-vs-200", "200-vs-200-seed1"):
    summary, path = built[name]
    _, rows_a, rows_b, _ = _tokens(path)
    if summary["tokens_file"] is None:
      assert summary["token_exact_fraction"] == 1.0
    ids += [_body(r) for r in np.concatenate([rows_a, rows_b])]
  exact = np.mean([[int(t) for t in vocabulary.encode(vocabulary.decode(i))] == i for i in ids])
  print(f"decode->encode exact for {exact:.3f} of {len(ids)} sampled SFT responses")
  assert exact >= 0.9


def test_same_checkpoint_on_both_sides_gives_independent_samples(built):
  summary, path = built["200-vs-200"]
  assert summary["source"] == "golden_pm:sft@200-vs-sft@200"
  examples = writers.read_examples(path)
  identical = np.mean([e.response_a == e.response_b for e in examples])
  assert identical < 0.5


def test_deterministic_given_the_seed(built):
  first = writers.read_examples(built["200-vs-200"][1])
  again = writers.read_examples(built["200-vs-200-again"][1])
  assert first == again
  other_seed = writers.read_examples(built["200-vs-200-seed1"][1])
  assert [e.response_a for e in other_seed] != [e.response_a for e in first]


def test_step_selection_picks_the_requested_checkpoint(world, built):
  d, _ = world
  early = {e.prompt: e for e in writers.read_examples(built["100-vs-200"][1])}
  late = {e.prompt: e for e in writers.read_examples(built["200-vs-200"][1])}
  common = sorted(set(early) & set(late))
  assert len(common) >= 15
  # Side b is step 200 in both (the default is the latest step), drawn from the same stream.
  assert all(early[p].response_b == late[p].response_b for p in common)
  # Side a: same stream, other parameters.
  assert np.mean([early[p].response_a != late[p].response_a for p in common]) > 0.3
  with pytest.raises(FileNotFoundError, match="step_a=150"):
    fixed_policy.fixed_policy_pairs(
        policy_a=str(d / "sft"), step_a=150, policy_b=str(d / "sft"), model_config=CFG,
        golden_pm_run=str(d / "golden"), golden_pm_config=CFG,
        prompts_data=str(d / "prompts.tfrecord"), output_data=str(d / "never.tfrecord"),
        feature_lengths=LENGTHS)
  assert not os.path.exists(d / "never.tfrecord")


def test_existing_output_is_not_overwritten(world, built):
  d, _ = world
  path = built["100-vs-200"][1]
  before = open(path, "rb").read()
  summary = fixed_policy.fixed_policy_pairs(
      policy_a=str(d / "random_policy"), policy_b=str(d / "random_policy"), model_config=CFG,
      golden_pm_run=str(d / "golden"), golden_pm_config=CFG,
      prompts_data=str(d / "prompts.tfrecord"), output_data=path, feature_lengths=LENGTHS)
  assert summary == {"skipped": True}
  assert open(path, "rb").read() == before


def test_sharded_placement_builds_the_same_dataset(world, built, tmp_path):
  """One device and fsdp over 4 x 2 give the dataset the default (8 x 1 data parallel) built."""
  d, _ = world
  _, reference = built["100-vs-200"]
  for name, part in (("one", stages.Partitioning(data=1)),
                     ("fsdp", stages.Partitioning(rules="fsdp", data=4, model=2))):
    path = str(tmp_path / f"{name}.tfrecord")
    fixed_policy.fixed_policy_pairs(
        policy_a=str(d / "sft"), step_a=100, policy_b=str(d / "sft"), model_config=CFG,
        golden_pm_run=str(d / "golden"), golden_pm_config=CFG,
        prompts_data=str(d / "prompts.tfrecord"), output_data=path, batch_size=16,
        feature_lengths=LENGTHS, partitioning_config=part)
    assert writers.read_examples(path) == writers.read_examples(reference), name
    for got, want in zip(_tokens(path), _tokens(reference)):
      np.testing.assert_array_equal(got, want)
