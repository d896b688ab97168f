"""Tests of t5align.data.tasks: the truncation rule, PM serialisation, seqio tasks vs numpy."""

import dataclasses

import numpy as np
import pytest
import seqio

from t5align.data import mini_world
from t5align.data import schema
from t5align.data import tasks
from t5align.data import tfds_builders
from t5align.data import vocab
from t5align.data import writers

# Every lexicon word of the miniature world is one token of the mini vocabulary,
# so token counts below are word counts.
LENGTHS = {"inputs": 32, "targets": 8}


@pytest.fixture(scope="module")
def vocabulary():
  return vocab.get_vocabulary()


def _words(n, offset=0):
  return " ".join(mini_world.NOUNS[(offset + i) % len(mini_world.NOUNS)] for i in range(n))


def _examples():
  """Pairs whose prompt and response lengths straddle the truncation limits."""
  out = []
  for i, (p, a, b) in enumerate([(3, 2, 4), (40, 7, 7), (31, 8, 12), (20, 1, 30), (12, 7, 6),
                                 (0, 3, 3), (18, 6, 7)]):
    out.append(schema.PreferenceExample(
        prompt=_words(p, i), response_a=_words(a, i + 1), response_b=_words(b, i + 2),
        label=(1.0, 0.0, 0.5, 0.75, 0.0, 1.0, 0.25)[i], task="mini", source="golden_pm",
        example_id=f"mini:{i}"))
  return out


# ------------------------------------------------------------- the rule, by hand


def test_prompt_and_response_rule_by_hand():
  ids = [10, 11, 12, 13, 14]
  np.testing.assert_array_equal(tasks.prompt_input_ids(ids, 4, 1), [12, 13, 14, 1])
  np.testing.assert_array_equal(tasks.prompt_input_ids(ids, 6, 1), [10, 11, 12, 13, 14, 1])
  np.testing.assert_array_equal(tasks.prompt_input_ids(ids, 9, 1), [10, 11, 12, 13, 14, 1])
  np.testing.assert_array_equal(tasks.response_target_ids(ids, 3, 1), [10, 11, 1])
  np.testing.assert_array_equal(tasks.response_target_ids(ids, 6, 1), [10, 11, 12, 13, 14, 1])
  np.testing.assert_array_equal(tasks.response_target_ids([], 6, 1), [1])


def _toy_format(inputs_length=12, targets_length=4):
  return tasks.PairFormat(inputs_length=inputs_length, targets_length=targets_length, eos_id=1,
                          response_1_marker=(101,), response_2_marker=(102,), question=(103, 104),
                          target_1_id=7, target_2_id=8)


def test_pair_input_budget_by_hand():
  fmt = _toy_format()
  # Responses keep T - 1 = 3 tokens; fixed = 1 + 1 + 2 + EOS = 5; the prompt gets 12 - 5 - 3 - 1 = 3.
  got = tasks.pair_input_ids([40, 41, 42, 43, 44], [20, 21, 22, 23, 24], [30], fmt)
  np.testing.assert_array_equal(got, [42, 43, 44, 101, 20, 21, 22, 102, 30, 103, 104, 1])
  # Short everything: nothing cut.
  got = tasks.pair_input_ids([40], [20], [30], fmt)
  np.testing.assert_array_equal(got, [40, 101, 20, 102, 30, 103, 104, 1])
  assert tasks.pm_target_id(0.5, fmt) == 7 and tasks.pm_target_id(0.49, fmt) == 8


def test_serialize_pair_text():
  assert tasks.serialize_pair("P", "A", "B") == "P response 1 : A response 2 : B better response:"


def test_pair_format_with_the_mini_vocabulary(vocabulary):
  fmt = tasks.pair_format(vocabulary, LENGTHS)
  pieces = vocabulary.tokenizer.id_to_piece
  assert [pieces(i) for i in fmt.response_1_marker] == ["▁response", "▁1", "▁", ":"]
  assert [pieces(i) for i in fmt.response_2_marker] == ["▁response", "▁2", "▁", ":"]
  assert [pieces(i) for i in fmt.question] == ["▁better", "▁response", ":"]
  assert (pieces(fmt.target_1_id), pieces(fmt.target_2_id)) == ("▁1", "▁2")
  assert fmt.pm_fixed_tokens == 12
  tasks.pair_format(vocabulary, {"inputs": 27, "targets": 8})  # 12 + 2 x 7 + 1 prompt token
  with pytest.raises(ValueError, match="cannot hold a PM input"):
    tasks.pair_format(vocabulary, {"inputs": 26, "targets": 8})
  with pytest.raises(ValueError, match="needs 'inputs'"):
    tasks.pair_format(vocabulary, {"inputs": 32})


def test_truncation_stats_counts_by_hand(vocabulary):
  stats = tasks.truncation_stats(_examples(), vocabulary, LENGTHS)
  # Prompts > 31 tokens: 40. Responses > 7 tokens: 8, 12, 30.
  # PM prompt budget = 32 - 12 - min(a, 7) - min(b, 7): (3,2,4) 14; (40,7,7) 6 cut;
  # (31,8,12) 6 cut; (20,1,30) 12 cut; (12,7,6) 7 cut; (0,3,3) 14; (18,6,7) 7 cut.
  assert dataclasses.asdict(stats) == {
      "examples": 7, "prompts_truncated": 1, "responses_truncated": 3, "pm_prompts_truncated": 5,
      "max_prompt_tokens": 40, "max_response_tokens": 30}


def test_tokenize_examples_layout(vocabulary):
  examples = _examples()
  arrays = tasks.tokenize_examples(examples, vocabulary, LENGTHS, with_pm_inputs=True)
  assert {k: (v.dtype, v.shape) for k, v in arrays.items()} == {
      "prompt": (np.int32, (7, 32)), "response_a": (np.int32, (7, 8)), "response_b": (np.int32, (7, 8)),
      "label": (np.float32, (7,)), "pm_inputs_ab": (np.int32, (7, 32)), "pm_inputs_ba": (np.int32, (7, 32))}
  encode = vocabulary.encode
  # The 40-word prompt keeps its last 31 words and EOS fills the row.
  np.testing.assert_array_equal(arrays["prompt"][1], encode(_words(40, 1))[-31:] + [1])
  # A 3-word prompt is padded with 0 after EOS.
  np.testing.assert_array_equal(arrays["prompt"][0], encode(_words(3, 0)) + [1] + [0] * 28)
  np.testing.assert_array_equal(arrays["response_b"][2], encode(_words(12, 4))[:7] + [1])
  np.testing.assert_array_equal(arrays["response_a"][3], encode(_words(1, 4)) + [1] + [0] * 6)
  np.testing.assert_array_equal(arrays["label"], [1.0, 0.0, 0.5, 0.75, 0.0, 1.0, 0.25])
  # PM input of pair 3 (prompt 20, a 1, b 30 -> 7): the prompt keeps 32 - 12 - 1 - 7 = 12 tokens.
  fmt = tasks.pair_format(vocabulary, LENGTHS)
  want_ab = (encode(_words(20, 3))[-12:] + list(fmt.response_1_marker) + encode(_words(1, 4))
             + list(fmt.response_2_marker) + encode(_words(30, 5))[:7] + list(fmt.question) + [1])
  np.testing.assert_array_equal(arrays["pm_inputs_ab"][3], want_ab)
  want_ba = (encode(_words(20, 3))[-12:] + list(fmt.response_1_marker) + encode(_words(30, 5))[:7]
             + list(fmt.response_2_marker) + encode(_words(1, 4)) + list(fmt.question) + [1])
  np.testing.assert_array_equal(arrays["pm_inputs_ba"][3], want_ba)


# ------------------------------------------------------------- seqio tasks == numpy


@pytest.fixture(scope="module")
def file_tasks(tmp_path_factory, vocabulary):
  path = str(tmp_path_factory.mktemp("tasks") / "pairs.tfrecord")
  writers.write_examples(path, _examples())
  return {use: tasks.register_preference_file_task(f"test_file_{use}", path, use=use,
                                                    vocabulary=vocabulary, feature_lengths=LENGTHS)
          for use in tasks.USES}


def _rows(task, seed=None, sequence_length=None):
  ds = task.get_dataset(sequence_length=sequence_length or LENGTHS, split="train", shuffle=False,
                        seed=seed)
  return list(ds.as_numpy_iterator())


def _unpad(row):
  return np.trim_zeros(row, "b")


def test_policy_task_matches_numpy(file_tasks, vocabulary):
  arrays = tasks.tokenize_examples(_examples(), vocabulary, LENGTHS)
  rows = _rows(file_tasks["policy"])
  assert len(rows) == 7
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(row["inputs"], _unpad(arrays["prompt"][i]))
    np.testing.assert_array_equal(row["targets"], _unpad(arrays["response_a"][i]))
    assert row["inputs_pretokenized"].decode() == _examples()[i].prompt


def test_sft_task_has_both_responses_of_every_pair(file_tasks, vocabulary):
  arrays = tasks.tokenize_examples(_examples(), vocabulary, LENGTHS)
  rows = _rows(file_tasks["sft"])
  assert len(rows) == 14
  for i in range(7):
    for row, key in zip(rows[2 * i:2 * i + 2], ("response_a", "response_b")):
      np.testing.assert_array_equal(row["inputs"], _unpad(arrays["prompt"][i]))
      np.testing.assert_array_equal(row["targets"], _unpad(arrays[key][i]))


def test_pm_ordered_task_matches_numpy(file_tasks, vocabulary):
  arrays = tasks.tokenize_examples(_examples(), vocabulary, LENGTHS, with_pm_inputs=True)
  fmt = tasks.pair_format(vocabulary, LENGTHS)
  rows = _rows(file_tasks["pm_ordered"])
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(row["inputs"], _unpad(arrays["pm_inputs_ab"][i]))
    label = _examples()[i].label
    assert row["label"] == np.float32(label)
    np.testing.assert_array_equal(row["targets"], [fmt.target_1_id if label >= 0.5 else fmt.target_2_id, 1])
    e = _examples()[i]
    assert row["inputs_pretokenized"].decode() == tasks.serialize_pair(e.prompt, e.response_a, e.response_b)


def test_pm_task_randomises_order_with_the_label(file_tasks, vocabulary):
  arrays = tasks.tokenize_examples(_examples(), vocabulary, LENGTHS, with_pm_inputs=True)
  fmt = tasks.pair_format(vocabulary, LENGTHS)
  swapped_patterns = []
  for seed in range(4):
    rows = _rows(file_tasks["pm"], seed=seed)
    assert [r["inputs"].tolist() for r in rows] == [r["inputs"].tolist() for r in _rows(file_tasks["pm"], seed=seed)]
    pattern = []
    for i, row in enumerate(rows):
      label = _examples()[i].label
      if np.array_equal(row["inputs"], _unpad(arrays["pm_inputs_ab"][i])):
        want_label, swapped = label, False
      else:
        np.testing.assert_array_equal(row["inputs"], _unpad(arrays["pm_inputs_ba"][i]))
        want_label, swapped = 1.0 - label, True
      assert row["label"] == np.float32(want_label)
      assert row["targets"][0] == (fmt.target_1_id if want_label >= 0.5 else fmt.target_2_id)
      pattern.append(swapped)
    swapped_patterns.append(tuple(pattern))
  flat = [s for p in swapped_patterns for s in p]
  assert any(flat) and not all(flat)  # 28 fair coin flips


def test_shorter_sequence_length_is_refused(file_tasks):
  with pytest.raises(ValueError, match="shorter than"):
    _rows(file_tasks["policy"], sequence_length={"inputs": 16, "targets": 8})


def test_register_tasks_on_a_prepared_mini_world(tmp_path, vocabulary):
  world = mini_world.MiniWorldConfig(num_train=12, num_validation=5, seed=3)
  data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="data prepare --dataset=mini"):
    tasks.register_tasks(dataset="mini", data_dir=data_dir, vocabulary=vocabulary, mini_config=world)
  tfds_builders.make_builder("mini", data_dir=data_dir, mini_config=world).download_and_prepare()
  names = tasks.register_tasks(dataset="mini", data_dir=data_dir, vocabulary=vocabulary,
                               mini_config=world, feature_lengths=LENGTHS, name_prefix="test_mini")
  assert names == {use: f"test_mini_{use}" for use in tasks.USES}
  examples = tfds_builders.load_examples("mini", "validation", data_dir=data_dir, mini_config=world)
  arrays = tasks.tokenize_examples(examples, vocabulary, LENGTHS, with_pm_inputs=True)
  task = seqio.get_mixture_or_task(names["pm_ordered"])
  rows = list(task.get_dataset(sequence_length=LENGTHS, split="validation", shuffle=False)
              .as_numpy_iterator())
  assert len(rows) == 5
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(row["inputs"], _unpad(arrays["pm_inputs_ab"][i]))


def test_jax_pair_serialisation_agrees_with_numpy(vocabulary):
  # The preference model builds its inputs on device from tokenized rows
  # (t5align.models.preference.serialize_pair); it must give the same tokens.
  from t5align.models import preference  # pylint: disable=g-import-not-at-top
  arrays = tasks.tokenize_examples(_examples(), vocabulary, LENGTHS, with_pm_inputs=True)
  fmt = tasks.pair_format(vocabulary, LENGTHS)
  device_fmt = fmt.for_model()
  for first, second, key in (("response_a", "response_b", "pm_inputs_ab"),
                             ("response_b", "response_a", "pm_inputs_ba")):
    got = preference.serialize_pair(arrays["prompt"], arrays[first], arrays[second], device_fmt,
                                    LENGTHS["inputs"])
    np.testing.assert_array_equal(np.asarray(got), arrays[key])
