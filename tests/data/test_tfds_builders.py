"""Tests of t5align.data.tfds_builders and t5align.data.prepare on fixture files and a small MiniWorld."""

import copy
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from t5align.data import mini_world
from t5align.data import prepare
from t5align.data import readers
from t5align.data import schema
from t5align.data import tfds_builders

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _copy(src, dst):
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copyfile(os.path.join(FIXTURES, src), dst)
  return dst


def _jsonl(path):
  return [json.loads(line) for line in open(path) if line.strip()]


def _write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def _by_id(examples):
  out = {e.example_id: e for e in examples}
  assert len(out) == len(examples)
  return out


def _prepared(dataset, data_dir, split, **kwargs):
  return _by_id(tfds_builders.load_examples(dataset, split, data_dir=data_dir, **kwargs))


def test_features_are_the_schema_fields(tmp_path):
  builder = tfds_builders.make_builder("tldr", data_dir=str(tmp_path))
  features = builder.info.features
  assert tuple(features.keys()) == schema.FIELDS
  assert features["label"].dtype == np.float32 and features["step"].dtype == np.int64


def test_tldr_hugging_face_layout(tmp_path):
  manual = tmp_path / "manual"
  # Both Hub layouts: split-named directories and split-named files.
  train = _copy("tldr/comparisons_good.json", str(manual / "comparisons" / "train" / "0000.json"))
  validation = _copy("tldr/comparisons_good.json",
                     str(manual / "comparisons" / "validation-00000-of-00001.json"))
  # The `axis` config of the same repository is not pairwise and must not be read.
  _copy("tldr/comparisons_bad.json", str(manual / "axis" / "validation-00000-of-00001.json"))
  data_dir = str(tmp_path / "tfds")
  report = prepare.prepare(dataset="tldr", manual_dir=str(manual), data_dir=data_dir)
  for split, path in (("train", train), ("validation", validation)):
    want, stats = readers.read_tldr_comparisons([path])
    assert _prepared("tldr", data_dir, split) == _by_id(want)
    assert report.split_sizes[split] == len(want)
    assert report.read_summaries[split] == stats.summary()
  assert report.tfds_name == "t5align_tldr:1.0.0" and not report.reused
  assert report.truncation == {}  # no vocabulary given
  again = prepare.prepare(dataset="tldr", data_dir=data_dir)  # no manual_dir needed now
  assert again.reused and again.split_sizes == report.split_sizes
  assert again.read_summaries == report.read_summaries


def test_tldr_openai_batch_layout_splits_by_field(tmp_path):
  # The fixture mixes 'train', 'valid1' and 'valid2' rows, like OpenAI's batch files.
  _copy("tldr/comparisons_good.json", str(tmp_path / "manual" / "comparisons" / "batch3.json"))
  data_dir = str(tmp_path / "tfds")
  prepare.prepare(dataset="tldr", manual_dir=str(tmp_path / "manual"), data_dir=data_dir)
  train = _prepared("tldr", data_dir, "train")
  validation = _prepared("tldr", data_dir, "validation")
  # Lines 4 and 5 repeat pairs 1 and 2, line 8 has equal summaries; line 3 is CNN/DM.
  assert sorted(train) == ["tldr:comparisons/batch3:1", "tldr:comparisons/batch3:2"]
  assert sorted(validation) == ["tldr:comparisons/batch3:7"]
  assert validation["tldr:comparisons/batch3:7"].response_b == "Tomatoes."


def test_bad_records_raise_or_are_skipped_and_counted(tmp_path):
  manual = tmp_path / "manual"
  train = [_copy("tldr/comparisons_good.json", str(manual / "train-0.json")),
           _copy("tldr/comparisons_bad.json", str(manual / "train-1.json"))]
  _copy("tldr/comparisons_good.json", str(manual / "validation.json"))
  with pytest.raises(schema.BadRecordError, match="train-1.json"):
    prepare.prepare(dataset="tldr", manual_dir=str(manual), data_dir=str(tmp_path / "a"))
  assert not os.path.exists(tfds_builders.prepared_dir("tldr", str(tmp_path / "a")))
  data_dir = str(tmp_path / "b")
  report = prepare.prepare(dataset="tldr", manual_dir=str(manual), data_dir=data_dir, skip_bad=True)
  want, stats = readers.read_tldr_comparisons(train, skip_bad=True)
  assert stats.skipped_bad > 0
  assert report.read_summaries["train"] == stats.summary()
  assert _prepared("tldr", data_dir, "train") == _by_id(want)


def test_missing_manual_files(tmp_path):
  with pytest.raises(ValueError, match="needs --manual_dir"):
    prepare.prepare(dataset="hh_helpful", data_dir=str(tmp_path / "tfds"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="missing or empty"):
    prepare.prepare(dataset="hh_helpful", manual_dir=str(tmp_path / "empty"),
                    data_dir=str(tmp_path / "tfds"))
  _copy("hh/helpful-base/train.jsonl.gz", str(tmp_path / "only_train" / "train.jsonl.gz"))
  with pytest.raises(FileNotFoundError, match="train.jsonl.gz and test.jsonl.gz"):
    prepare.prepare(dataset="hh_helpful", manual_dir=str(tmp_path / "only_train"),
                    data_dir=str(tmp_path / "tfds"))
  assert not os.path.exists(tfds_builders.prepared_dir("hh_helpful", str(tmp_path / "tfds")))


def test_hh_subset_directory_and_test_split(tmp_path):
  manual = tmp_path / "hh"
  train = _copy("hh/helpful-base/train.jsonl.gz", str(manual / "helpful-base" / "train.jsonl.gz"))
  test = _copy("hh/harmless-base/test.jsonl", str(manual / "helpful-base" / "test.jsonl"))
  # Another subset next to it must not be read.
  _copy("hh/helpful-base/bad.jsonl", str(manual / "harmless-base" / "train.jsonl"))
  data_dir = str(tmp_path / "tfds")
  prepare.prepare(dataset="hh_helpful", manual_dir=str(manual), data_dir=data_dir)
  for split, path in (("train", train), ("validation", test)):
    want, _ = readers.read_hh([path], subset="helpful-base")
    assert _prepared("hh_helpful", data_dir, split) == _by_id(want)


def test_hh_manual_dir_may_be_the_subset_itself(tmp_path):
  subset = tmp_path / "harmless-base"
  train = _copy("hh/harmless-base/test.jsonl", str(subset / "train.jsonl"))
  test = _copy("hh/harmless-base/test.jsonl", str(subset / "test.jsonl"))
  data_dir = str(tmp_path / "tfds")
  report = prepare.prepare(dataset="hh_harmless", manual_dir=str(subset), data_dir=data_dir)
  for split, path in (("train", train), ("validation", test)):
    want, _ = readers.read_hh([path], subset="harmless-base")
    assert _prepared("hh_harmless", data_dir, split) == _by_id(want)
    assert report.split_sizes[split] == len(want) > 0
    assert all(e.task == "hh_harmless" for e in want)


def _independent_arena_split(question_id):
  digest = hashlib.sha256(f"chat_arena:{question_id}".encode()).hexdigest()
  return "validation" if int(digest[:16], 16) / 2.0**64 < 0.05 else "train"


def test_chat_arena_hash_hold_out(tmp_path):
  template = _jsonl(os.path.join(FIXTURES, "arena/arena_good.jsonl"))[0]
  generated = []
  for i in range(300):
    r = copy.deepcopy(template)
    r["question_id"] = f"q{i:05d}"
    r["conversation_a"][1]["content"] = f"answer a {i}"
    r["conversation_b"][1]["content"] = f"answer b {i}"
    r["winner"] = ("model_a", "model_b")[i % 2]
    generated.append(r)
  manual = tmp_path / "arena"
  _write_jsonl(str(manual / "data" / "generated.jsonl"), generated)
  fixture = _copy("arena/arena_good.jsonl", str(manual / "data" / "train.jsonl"))
  data_dir = str(tmp_path / "tfds")
  report = prepare.prepare(dataset="chat_arena", manual_dir=str(manual), data_dir=data_dir)
  want, stats = readers.read_chatbot_arena(
      [str(manual / "data" / "generated.jsonl"), fixture])
  assert report.read_summaries == {"all": stats.summary()}
  got = {split: _prepared("chat_arena", data_dir, split) for split in tfds_builders.SPLITS}
  assert {**got["train"], **got["validation"]} == _by_id(want)
  for split, examples in got.items():
    for example_id in examples:
      assert _independent_arena_split(example_id.split(":", 1)[1]) == split
  assert 5 <= len(got["validation"]) <= 30  # 5% of 303, loosely


def test_mini_config_names():
  assert tfds_builders.mini_builder_config().name == "default"
  assert tfds_builders.mini_builder_config(mini_world.MiniWorldConfig()).name == "default"
  a = tfds_builders.mini_builder_config(mini_world.MiniWorldConfig(seed=1)).name
  b = tfds_builders.mini_builder_config(mini_world.MiniWorldConfig(seed=2)).name
  assert a != b and a.startswith("w") and len(a) == 13
  assert tfds_builders.tfds_name("mini") == "t5align_mini/default:1.0.0"
  assert tfds_builders.tfds_name("hh_harmless") == "t5align_hh_harmless:1.0.0"
  with pytest.raises(ValueError, match="unknown dataset"):
    tfds_builders.tfds_name("tldr2")
  with pytest.raises(ValueError, match="mini_config applies"):
    tfds_builders.tfds_name("tldr", mini_config=mini_world.MiniWorldConfig())


def test_mini_world_prepare(tmp_path):
  world = mini_world.MiniWorldConfig(num_train=30, num_validation=10, seed=7)
  data_dir = str(tmp_path)
  report = prepare.prepare(dataset="mini", data_dir=data_dir, mini_config=world,
                           feature_lengths={"inputs": 40, "targets": 8})
  assert report.split_sizes == {"train": 30, "validation": 10}
  generated = mini_world.MiniWorld(world)
  for split in tfds_builders.SPLITS:
    assert _prepared("mini", data_dir, split, mini_config=world) == _by_id(generated.d_initial(split))
    assert report.truncation[split].examples == report.split_sizes[split]
  assert report.path == os.path.join(data_dir, "t5align_mini",
                                     tfds_builders.mini_builder_config(world).name, "1.0.0")
  builder = tfds_builders.make_builder("mini", data_dir=data_dir, mini_config=world)
  assert builder.info.metadata["mini_world_config"]["seed"] == 7
  assert "truncation at {'inputs': 40, 'targets': 8}" in report.summary()


def test_data_prepare_command_line_on_the_mini_world(tmp_path, capsys):
  from t5align import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["data", "prepare", "--dataset=mini", f"--data_dir={tmp_path}",
                   "--inputs_length=96", "--targets_length=16"]) == 0
  out = capsys.readouterr().out
  assert "mini:" in out and "train:" in out and "validation:" in out
  with pytest.raises(SystemExit):
    cli.main(["data", "prepare", "--dataset=nope", f"--data_dir={tmp_path}"])
