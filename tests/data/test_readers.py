"""Readers of the public preference datasets, on hand-written fixtures in the public schemas.

Expected examples are written out by hand from the fixture files (see
tests/data/fixtures/README.md), not produced by the reader.
"""

import collections
import gzip
import hashlib
import json
import logging
import os
import random
import re
import shutil

import pytest

from t5align.data import readers
from t5align.data.schema import BadRecordError, PreferenceExample

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TLDR_GOOD = os.path.join(FIXTURES, "tldr", "comparisons_good.json")
TLDR_BAD = os.path.join(FIXTURES, "tldr", "comparisons_bad.json")
HH_GOOD = os.path.join(FIXTURES, "hh", "helpful-base", "train.jsonl.gz")
HH_BAD = os.path.join(FIXTURES, "hh", "helpful-base", "bad.jsonl")
HH_HARMLESS = os.path.join(FIXTURES, "hh", "harmless-base", "test.jsonl")
ARENA_GOOD = os.path.join(FIXTURES, "arena", "arena_good.jsonl")
ARENA_BAD = os.path.join(FIXTURES, "arena", "arena_bad.jsonl")

CAT_PROMPT = ("SUBREDDIT: r/pets\nTITLE: My cat ran away, what now?\n"
              "POST: My cat slipped out last week and has not come back. I put up posters.\nTL;DR:")
BIKE_PROMPT = ("SUBREDDIT: r/bicycling\nTITLE: First commute by bike [26M]\n"
               "POST: Rode 12 km to work today.\nLegs are sore but I loved it.\nTL;DR:")
PLANT_PROMPT = ("SUBREDDIT: r/gardening\nTITLE: Tomatoes split?\n"
                "POST: My tomatoes keep splitting after rain.\nTL;DR:")
FISH_PROMPT = "\n\nHuman: What is a good name for a goldfish?\n\nAssistant:"
BREAD_PROMPT = ("\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure, what kind of bread?"
                "\n\nHuman: A simple white loaf.\n\nAssistant:")
CAPITAL_PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"

TLDR_EXPECTED = [
    PreferenceExample(CAT_PROMPT, "I want my cat back.", "Cat left a week ago, posters are up.",
                      0.0, "tldr", "human", "tldr:tldr/comparisons_good:1"),
    PreferenceExample(BIKE_PROMPT, "Biked to work, loved it.", "I rode a bike.",
                      1.0, "tldr", "human", "tldr:tldr/comparisons_good:2"),
    # Line 6 is blank; line numbers stay physical.
    PreferenceExample(PLANT_PROMPT, "Rain makes my tomatoes split, why?", "Tomatoes.",
                      1.0, "tldr", "human", "tldr:tldr/comparisons_good:7"),
]
HH_EXPECTED = [
    # sha256 bit of the id is 0: chosen first.
    PreferenceExample(FISH_PROMPT, "Bubbles is a classic name for a goldfish.", "I don't know.",
                      1.0, "hh_helpful", "human", "hh_helpful:helpful-base/train:1"),
    # Bit 1: rejected first.
    PreferenceExample(BREAD_PROMPT, "Buy one at the store.",
                      "Mix flour, water, salt and yeast, knead, let it rise, then bake.",
                      0.0, "hh_helpful", "human", "hh_helpful:helpful-base/train:2"),
    PreferenceExample(CAPITAL_PROMPT, "Paris.", "Lyon, I think.",
                      1.0, "hh_helpful", "human", "hh_helpful:helpful-base/train:5"),
]
ARENA_EXPECTED = [
    PreferenceExample("What is the capital of France?", "The capital of France is Paris.",
                      "Paris is in France.", 1.0, "chat_arena", "human",
                      "chat_arena:58210e39b3fd4441a2bd4a518bb44c2d"),
    PreferenceExample("Write a haiku about rain.", "Rain on the window",
                      "Soft rain on the roof\nlistening to the grey sky\nthe garden drinks deep",
                      0.0, "chat_arena", "human", "chat_arena:2564acd09e3942fd97657d05282d4389"),
    PreferenceExample("Say hi.", "Hi there!", "hello", 1.0, "chat_arena", "human",
                      "chat_arena:f1d2c3b4a5964738a1b2c3d4e5f60718"),
]
ARENA_TIES = [
    PreferenceExample("Hola, ¿cómo estás?", "¡Bien, gracias!", "Estoy bien.", 0.5, "chat_arena",
                      "human", "chat_arena:90bfd142157948aba01931726c888e7f"),
    PreferenceExample("2+2?", "5", "22", 0.5, "chat_arena", "human",
                      "chat_arena:a9c9b3e2cd3a4cf3b5e6b3b5ab3fd0a1"),
]


def _lines(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return f.read().splitlines()


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _content(examples):
  return [(e.prompt, e.response_a, e.response_b, e.label, e.task, e.source) for e in examples]


def _winner_first(examples):
  """Contents with the preferred response first: hh order depends on the file's id."""
  return _content(e.swapped() if e.label < 0.5 else e for e in examples)


def _check_accounting(stats):
  assert stats.read == (stats.kept + stats.skipped_bad + stats.ties_dropped
                        + stats.multi_turn_dropped + stats.duplicates_dropped
                        + sum(stats.dropped.values()))


# ------------------------------------------------------------------------- TL;DR


def test_tldr_good_records_field_by_field():
  examples, stats = readers.read_tldr_comparisons(TLDR_GOOD)
  assert examples == TLDR_EXPECTED
  assert stats.files == [TLDR_GOOD]
  assert (stats.read, stats.kept, stats.skipped_bad) == (7, 3, 0)
  # Line 4 repeats line 1 with the sides swapped and the same preference; line 5
  # repeats line 2 with the opposite choice.
  assert (stats.duplicates_dropped, stats.duplicate_label_conflicts) == (2, 1)
  assert stats.dropped == {"no_post": 1, "identical_responses": 1}
  _check_accounting(stats)


def test_tldr_split_filter():
  examples, stats = readers.read_tldr_comparisons(TLDR_GOOD, splits={"train"})
  assert examples == TLDR_EXPECTED[:2]
  # The CNN/DM item (valid2) and the valid1 item go as other splits first.
  assert stats.dropped == {"other_split": 2, "identical_responses": 1}
  _check_accounting(stats)
  with pytest.raises(TypeError, match="collection"):
    readers.read_tldr_comparisons(TLDR_GOOD, splits="train")


def test_tldr_json_array_and_gzip_read_like_json_lines(tmp_path):
  records = [json.loads(line) for line in _lines(TLDR_GOOD) if line]
  array = tmp_path / "tldr" / "array.json"
  array.parent.mkdir()
  array.write_text(json.dumps(records, indent=1))
  examples, stats = readers.read_tldr_comparisons(str(array))
  assert _content(examples) == _content(TLDR_EXPECTED)
  # Array elements are numbered from 0 and blank lines do not exist there.
  assert [e.example_id for e in examples] == ["tldr:tldr/array:0", "tldr:tldr/array:1",
                                              "tldr:tldr/array:5"]
  assert stats.read == 7

  gz = _write(str(tmp_path / "tldr" / "comparisons_good.json.gz"), _lines(TLDR_GOOD))
  examples, _ = readers.read_tldr_comparisons(gz)
  assert examples == TLDR_EXPECTED  # Same parent/stem, so the same ids.


def test_tldr_bad_array_element_and_broken_array(tmp_path):
  records = [json.loads(line) for line in _lines(TLDR_GOOD)[:2]]
  records.append({**records[0], "choice": 7})
  path = tmp_path / "array.json"
  path.write_text(json.dumps(records))
  with pytest.raises(BadRecordError, match=r"array\.json: record element 2: field 'choice'"):
    readers.read_tldr_comparisons(str(path))
  examples, stats = readers.read_tldr_comparisons(str(path), skip_bad=True)
  assert len(examples) == 2 and stats.bad_reasons == {"bad_choice": 1}

  path.write_text(json.dumps(records)[:-5])
  # A broken array cannot be skipped record by record.
  with pytest.raises(BadRecordError, match=r"array\.json: record line 1: field '<json>'"):
    readers.read_tldr_comparisons(str(path), skip_bad=True)


# ------------------------------------------------------------------------- hh-rlhf


def test_hh_good_records_field_by_field():
  examples, stats = readers.read_hh(HH_GOOD, subset="helpful-base")
  assert examples == HH_EXPECTED
  assert (stats.read, stats.kept, stats.duplicates_dropped) == (5, 3, 1)
  assert stats.dropped == {"identical_responses": 1}
  _check_accounting(stats)


def test_hh_order_follows_documented_hash():
  # Independent restatement of the documented rule: bit 0 of sha256(id)[0] == 1 -> rejected first.
  chosen = {1: "Bubbles is a classic name for a goldfish.",
            2: "Mix flour, water, salt and yeast, knead, let it rise, then bake.", 5: "Paris."}
  for example in readers.read_hh(HH_GOOD, subset="helpful-base")[0]:
    line = int(example.example_id.rsplit(":", 1)[1])
    rejected_first = hashlib.sha256(example.example_id.encode()).digest()[0] & 1
    assert example.label == (0.0 if rejected_first else 1.0)
    winner = example.response_a if example.label == 1.0 else example.response_b
    assert winner == chosen[line]


def test_hh_labels_balanced_and_winner_is_chosen(tmp_path):
  n = 400
  lines = [json.dumps({"chosen": f"\n\nHuman: q{i}?\n\nAssistant: good {i}",
                       "rejected": f"\n\nHuman: q{i}?\n\nAssistant: bad {i}"}) for i in range(n)]
  path = _write(str(tmp_path / "helpful-base" / "train.jsonl"), lines)
  examples, _ = readers.read_hh(path, subset="helpful-base")
  assert len(examples) == n
  for e in examples:
    winner, loser = (e.response_a, e.response_b) if e.label == 1.0 else (e.response_b, e.response_a)
    assert winner.startswith("good ") and loser.startswith("bad ")
  # Binomial(400, 1/2) has sd 10: 0.4..0.6 is 4 sd either side.
  assert 0.4 < sum(e.label for e in examples) / n < 0.6
  assert readers.read_hh(path, subset="helpful-base")[0] == examples


def test_hh_harmless_via_readers_table():
  examples, stats = readers.READERS["hh_harmless"](HH_HARMLESS, skip_bad=False)
  assert [e.task for e in examples] == ["hh_harmless"] * 2
  assert [e.example_id for e in examples] == ["hh_harmless:harmless-base/test:1",
                                              "hh_harmless:harmless-base/test:2"]
  assert examples[0].prompt == "\n\nHuman: How do I sharpen a kitchen knife?\n\nAssistant:"
  assert stats.kept == 2
  with pytest.raises(ValueError, match="subset"):
    readers.read_hh(HH_HARMLESS, subset="red-team-attempts")


# ------------------------------------------------------------------------- Chatbot Arena


def test_arena_good_records_field_by_field():
  examples, stats = readers.read_chatbot_arena(ARENA_GOOD)
  assert examples == ARENA_EXPECTED
  assert (stats.read, stats.kept, stats.ties_dropped, stats.multi_turn_dropped,
          stats.duplicates_dropped, stats.duplicate_label_conflicts) == (7, 3, 2, 1, 1, 0)
  assert not stats.dropped
  _check_accounting(stats)


def test_arena_keep_ties_and_multi_turn_rule():
  examples, stats = readers.read_chatbot_arena(ARENA_GOOD, keep_ties=True)
  assert examples == ARENA_EXPECTED[:2] + ARENA_TIES + ARENA_EXPECTED[2:]
  assert (stats.ties_dropped, stats.multi_turn_dropped) == (0, 1)
  # The two-turn battle is dropped whatever its winner, never cut to its first turn.
  assert "chat_arena:c5e2b6a1b7f34b0e9f3ad86b2a5d7e10" not in {e.example_id for e in examples}
  assert not any(e.prompt == "Name a fruit." for e in examples)


def test_arena_parquet_reads_like_json_lines(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = [json.loads(line) for line in _lines(ARENA_GOOD)]
  path = str(tmp_path / "data" / "train-00000-of-00001.parquet")
  os.makedirs(os.path.dirname(path))
  pq.write_table(pa.Table.from_pylist(rows), path)
  examples, stats = readers.read_chatbot_arena(path)
  assert examples == ARENA_EXPECTED
  assert stats.read == 7

  bad = dict(rows[0], question_id="ffff", winner="model_c")
  pq.write_table(pa.Table.from_pylist(rows + [bad]), path)
  with pytest.raises(BadRecordError, match=r"train-00000-of-00001\.parquet: record row 7: "
                                           r"field 'winner': unknown winner 'model_c'"):
    readers.read_chatbot_arena(path)


def test_arena_question_id_reused_for_another_pair(tmp_path):
  rows = [json.loads(line) for line in _lines(ARENA_GOOD)]
  clash = json.loads(json.dumps(rows[6]))
  clash["question_id"] = rows[0]["question_id"]
  path = _write(str(tmp_path / "clash.jsonl"), [json.dumps(rows[0]), json.dumps(clash)])
  with pytest.raises(BadRecordError, match=r"clash\.jsonl: record line 2: field 'question_id'"):
    readers.read_chatbot_arena(path)
  # The same battle in two files is a duplicate, not a clash.
  examples, stats = readers.read_chatbot_arena([ARENA_GOOD, _write(str(tmp_path / "copy.jsonl"),
                                                                   _lines(ARENA_GOOD))])
  assert examples == ARENA_EXPECTED and stats.duplicates_dropped == 1 + 4


# ------------------------------------------------------------------------- bad records

TLDR_BAD_CASES = [
    (1, "<json>", "malformed_json"), (2, "<record>", "not_an_object"),
    (3, "summaries", "missing_field"), (4, "choice", "bad_choice"), (5, "choice", "wrong_type"),
    (6, "summaries", "bad_summaries"), (7, "summaries[1].text", "empty_response"),
    (8, "info.post", "missing_field"), (9, "info.title", "wrong_type"),
    (10, "summaries[0].text", "missing_field"),
]
HH_BAD_CASES = [
    (1, "<json>", "malformed_json"), (2, "rejected", "missing_field"), (3, "chosen", "wrong_type"),
    (4, "rejected", "no_assistant_turn"), (5, "chosen", "empty_response"),
    (6, "rejected", "prompt_mismatch"),
]
ARENA_BAD_CASES = [
    (1, "<json>", "malformed_json"), (2, "winner", "unknown_winner"),
    (3, "conversation_b", "missing_field"), (4, "turn", "wrong_type"),
    (5, "conversation_b", "prompt_mismatch"), (6, "conversation_a[1].content", "empty_response"),
    (7, "conversation_a[0].role", "bad_conversation"), (8, "conversation_a", "bad_conversation"),
    (9, "question_id", "missing_field"),
]
READ = {
    "tldr": readers.read_tldr_comparisons,
    "hh": lambda paths, **kw: readers.read_hh(paths, subset="helpful-base", **kw),
    "arena": readers.read_chatbot_arena,
}
CASES = ([("tldr", TLDR_GOOD, TLDR_BAD, ".json") + c for c in TLDR_BAD_CASES]
         + [("hh", HH_GOOD, HH_BAD, ".jsonl") + c for c in HH_BAD_CASES]
         + [("arena", ARENA_GOOD, ARENA_BAD, ".jsonl") + c for c in ARENA_BAD_CASES])


@pytest.mark.parametrize("kind, good, bad, suffix, line, field, reason", CASES,
                         ids=[f"{c[0]}-{c[4]}-{c[6]}" for c in CASES])
def test_bad_record_names_file_line_and_field(kind, good, bad, suffix, line, field, reason,
                                              tmp_path):
  good_lines = _lines(good)
  path = _write(str(tmp_path / "mixed" / f"after_good{suffix}"),
                good_lines + [_lines(bad)[line - 1]])
  bad_line = len(good_lines) + 1
  with pytest.raises(BadRecordError) as info:
    READ[kind](path)
  message = str(info.value)
  assert "after_good" + suffix in message
  assert f"line {bad_line}:" in message
  assert f"field {field!r}" in message
  assert (info.value.record, info.value.field) == (f"line {bad_line}", field)

  examples, stats = READ[kind](path, skip_bad=True)
  assert _winner_first(examples) == _winner_first(READ[kind](good)[0])
  assert stats.skipped_bad == 1 and stats.bad_reasons == {reason: 1}
  assert stats.first_bad == message


@pytest.mark.parametrize("kind, bad, cases", [("tldr", TLDR_BAD, TLDR_BAD_CASES),
                                              ("hh", HH_BAD, HH_BAD_CASES),
                                              ("arena", ARENA_BAD, ARENA_BAD_CASES)])
def test_skip_bad_counts_and_warns_once(kind, bad, cases, caplog):
  with pytest.raises(BadRecordError, match="line 1: field '<json>'"):
    READ[kind](bad)
  with caplog.at_level(logging.WARNING, logger=readers.__name__):
    examples, stats = READ[kind](bad, skip_bad=True)
  assert examples == []
  assert stats.read == stats.skipped_bad == len(cases)
  assert stats.bad_reasons == collections.Counter(reason for _, _, reason in cases)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert f"skipped {len(cases)} bad record(s)" in warnings[0]
  assert os.path.basename(bad) + ": record line 1" in warnings[0]
  assert f"{len(cases)} bad skipped" in stats.summary()


# ------------------------------------------------------------------------- paths and files


def test_glob_and_list_paths_and_same_file_once():
  pattern = os.path.join(FIXTURES, "hh", "*", "t*.jsonl*")
  examples, stats = readers.READERS["hh_helpful"](pattern, skip_bad=False)
  assert stats.files == [HH_HARMLESS, HH_GOOD]  # Sorted glob order.
  assert [e.example_id for e in examples] == [
      "hh_helpful:harmless-base/test:1", "hh_helpful:harmless-base/test:2",
      "hh_helpful:helpful-base/train:1", "hh_helpful:helpful-base/train:2",
      "hh_helpful:helpful-base/train:5"]

  recursive = os.path.join(FIXTURES, "**", "t*.jsonl*")
  assert readers.READERS["hh_helpful"](recursive, skip_bad=False)[0] == examples

  examples, stats = readers.read_hh([HH_GOOD, HH_HARMLESS, pattern], subset="helpful-base")
  assert stats.files == [HH_GOOD, HH_HARMLESS]  # Given order; each file once.
  assert examples[:3] == HH_EXPECTED and stats.duplicates_dropped == 1


def test_same_stem_in_two_directories_is_refused(tmp_path):
  copy = tmp_path / "tldr" / "comparisons_good.json"
  copy.parent.mkdir()
  shutil.copy(TLDR_GOOD, copy)
  with pytest.raises(ValueError, match="same example ids"):
    readers.read_tldr_comparisons([TLDR_GOOD, str(copy)])
  other = tmp_path / "other" / "comparisons_good.json"
  other.parent.mkdir()
  shutil.copy(TLDR_GOOD, other)
  examples, stats = readers.read_tldr_comparisons([TLDR_GOOD, str(other)])
  # The copy's five kept-or-duplicate Reddit lines all repeat the first file's pairs.
  assert examples == TLDR_EXPECTED
  assert (stats.duplicates_dropped, stats.duplicate_label_conflicts) == (2 + 5, 1 + 1)


def test_missing_unsupported_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no files match"):
    readers.read_chatbot_arena(str(tmp_path / "*.parquet"))
  with pytest.raises(FileNotFoundError, match="no such file"):
    readers.read_chatbot_arena(str(tmp_path / "absent.jsonl"))
  csv = tmp_path / "arena.csv"
  csv.write_text("question_id,winner\n")
  with pytest.raises(ValueError, match=r"arena\.csv: unsupported file type"):
    readers.read_chatbot_arena(str(csv))
  broken = tmp_path / "train.jsonl.gz"
  broken.write_bytes(gzip.compress(b'{"chosen": "x"}\n' * 50)[:40])
  # The first 40 bytes inflate to all 50 lines; the stream end is missing.
  with pytest.raises(BadRecordError, match=r"train\.jsonl\.gz: record line 51: field '<file>': "
                     "cannot decompress"):
    readers.read_hh(str(broken), subset="helpful-base", skip_bad=True)


def test_readers_table_and_summary():
  assert set(readers.READERS) == {"tldr", "hh_helpful", "hh_harmless", "chat_arena"}
  paths = {"tldr": TLDR_GOOD, "hh_helpful": HH_GOOD, "hh_harmless": HH_HARMLESS,
           "chat_arena": ARENA_GOOD}
  for task, reader in readers.READERS.items():
    examples, stats = reader(paths[task], skip_bad=True)
    assert stats.task == task and {e.task for e in examples} == {task}
    assert {e.source for e in examples} == {"human"} and {e.step for e in examples} == {-1}
    assert len({e.example_id for e in examples}) == len(examples)
  _, stats = readers.read_chatbot_arena(ARENA_GOOD)
  assert stats.summary() == (
      "chat_arena: 1 file(s), 7 records read, 3 kept; 2 ties dropped; "
      "1 multi-turn dropped; 1 duplicates dropped (0 with a conflicting label)")


# ------------------------------------------------------------------------- hostile text and files

def _hh_line(question, good="Yes.", bad="No."):
  return json.dumps({"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                     "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"})


def _write_bytes(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return path


@pytest.mark.parametrize("line, field, reason", [
    # A lone surrogate as a JSON escape, in a field the reader uses ...
    (_hh_line("q?", good="Yes \ud800."), "chosen", "bad_encoding"),
    # ... and as raw (CESU-style) bytes, which json.loads(bytes) would let through.
    (_hh_line("q?").replace("Yes.", "Yes \udc80.").encode("utf-8", "surrogatepass"), "<json>",
     "bad_encoding"),
    (_hh_line("q?").encode().replace(b"Yes.", b"Yes \xff."), "<json>", "bad_encoding"),
    # Unused fields are text too; keys as well.
    (_hh_line("q?")[:-1] + ', "note": "\\udfff"}', "note", "bad_encoding"),
    (_hh_line("q?")[:-1] + ', "\\ud800": 1}', "\ud800", "bad_encoding"),
    # Duplicate keys, at the top and nested.
    (_hh_line("q?")[:-1] + ', "chosen": "\\n\\nHuman: q?\\n\\nAssistant: Maybe."}', "chosen",
     "duplicate_key"),
    (_hh_line("q?")[:-1] + ', "meta": {"a": 1, "a": 2}}', "meta.a", "duplicate_key"),
    # Nesting: parseable but deeper than MAX_JSON_DEPTH, and deep enough to break json.
    (_hh_line("q?")[:-1] + ', "x": ' + "[" * 40 + "]" * 40 + "}", "x" + "[0]" * 32,
     "too_deep"),
    (_hh_line("q?")[:-1] + ', "x": ' + "[" * 1000 + "]" * 1000 + "}", None, "too_deep"),
    (_hh_line("q?")[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", None, "too_deep"),
])
def test_unencodable_duplicated_and_deep_records_are_bad(tmp_path, line, field, reason):
  line = line.encode() if isinstance(line, str) else line
  good = [_hh_line(f"q{i}?").encode() for i in range(3)]
  path = _write_bytes(str(tmp_path / "helpful-base" / "train.jsonl"), good[:2] + [line, good[2]])
  with pytest.raises(BadRecordError) as info:
    readers.read_hh(path, subset="helpful-base")
  assert info.value.path == path and info.value.record == "line 3"
  if field is not None:
    assert info.value.field == field
  examples, stats = readers.read_hh(path, subset="helpful-base", skip_bad=True)
  assert [e.example_id for e in examples] == [f"hh_helpful:helpful-base/train:{n}"
                                               for n in (1, 2, 4)]
  assert (stats.read, stats.skipped_bad, stats.bad_reasons) == (4, 1, {reason: 1})
  for e in examples:  # Everything kept can be written as UTF-8.
    for text in (e.prompt, e.response_a, e.response_b, e.example_id):
      text.encode("utf-8")


def test_valid_escapes_and_bom_are_accepted(tmp_path):
  # An escaped surrogate *pair* is one astral character; a BOM may start the file.
  line = _hh_line("emoji?", good="Here: \U0001F600")
  assert "\\ud83d\\ude00" in line
  path = _write_bytes(str(tmp_path / "helpful-base" / "train.jsonl"),
                      [b"\xef\xbb\xbf" + line.encode()])
  (example,), _ = readers.read_hh(path, subset="helpful-base")
  assert "Here: \U0001F600" in (example.response_a, example.response_b)


def test_json_array_file_level_and_element_problems(tmp_path):
  path = tmp_path / "array.json"
  records = [json.loads(line) for line in _lines(TLDR_GOOD)[:2]]
  text = json.dumps(records, indent=1)
  # A duplicate key spoils its own element only.
  path.write_text(text.replace('"choice": 1', '"choice": 1, "choice": 0', 1))
  examples, stats = readers.read_tldr_comparisons(str(path), skip_bad=True)
  assert (len(examples), stats.bad_reasons) == (1, {"duplicate_key": 1})
  # Raw surrogate bytes or nesting json cannot parse lose the whole array: always an error.
  lines = text.encode().split(b"\n")
  lines[5] = lines[5].replace(b'": "', b'": "\xed\xa0\x80', 1)
  path.write_bytes(b"\n".join(lines))
  with pytest.raises(BadRecordError, match=r"array\.json: record line 6: field '<json>': not "
                                           "valid UTF-8"):
    readers.read_tldr_comparisons(str(path), skip_bad=True)
  path.write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(BadRecordError, match=r"array\.json: record file: field '<json>': nested "
                                           "too deep"):
    readers.read_tldr_comparisons(str(path), skip_bad=True)


def test_damaged_gzip_is_an_error_naming_the_file_never_altered_rows(tmp_path):
  lines = [_hh_line(f"question {i} {'x' * (i % 17)}?", good=f"answer {i}") for i in range(300)]
  path = _write(str(tmp_path / "helpful-base" / "train.jsonl.gz"), lines)
  data = open(path, "rb").read()
  want, _ = readers.read_hh(path, subset="helpful-base")
  rng = random.Random(13)
  errors = 0
  for _ in range(40):
    damaged = bytearray(data)
    position = rng.randrange(10, len(data))  # past the fixed header
    damaged[position] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
      f.write(damaged)
    try:
      got, _ = readers.read_hh(path, subset="helpful-base", skip_bad=True)
    except BadRecordError as e:
      assert e.path == path and e.field == "<file>" and "cannot decompress" in e.problem
      assert re.fullmatch(r"line \d+", e.record)
      errors += 1
      continue
    assert got == want  # A flip gzip's CRC cannot see changed no record.
  assert errors >= 30


def test_damaged_parquet_is_an_error_naming_the_file(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = [json.loads(line) for line in _lines(ARENA_GOOD)]
  path = str(tmp_path / "train.parquet")
  # With page checksums, a flipped letter that would still decode is caught.
  pq.write_table(pa.Table.from_pylist(rows), path, compression="none", write_page_checksum=True)
  data = open(path, "rb").read()
  position = data.index(b"The capital of France is Paris.") + len("The capital of France is ")
  with open(path, "wb") as f:
    f.write(data[:position] + b"p" + data[position + 1:])
  with pytest.raises(BadRecordError, match=r"train\.parquet: record row 0: field '<file>': not a "
                                           "readable parquet file from this row on"):
    readers.read_chatbot_arena(path, skip_bad=True)
  # Without them (pyarrow's default), any damage is an error or, at worst, undetectable.
  pq.write_table(pa.Table.from_pylist(rows * 50), path)
  data = open(path, "rb").read()
  rng = random.Random(5)
  for _ in range(30):
    damaged = bytearray(data)
    start = rng.randrange(4, len(data) - 16)
    damaged[start:start + 8] = bytes(b ^ 0xFF for b in damaged[start:start + 8])
    with open(path, "wb") as f:
      f.write(damaged)
    try:
      readers.read_chatbot_arena(path, skip_bad=True)
    except BadRecordError as e:  # records are skipped, so only the file can fail
      assert e.path == path and e.field == "<file>" and e.record.startswith("row ")


@pytest.mark.parametrize("order", ["tie_first", "clash_with_a_third_pair"])
def test_arena_question_id_reuse_is_bad_whatever_the_first_record(tmp_path, order):
  rows = [json.loads(line) for line in _lines(ARENA_GOOD)]
  if order == "tie_first":
    # Row 2 is a tie (dropped); a kept battle reusing its id is still a reuse.
    clash = dict(rows[0], question_id=rows[2]["question_id"])
    lines = [rows[2], clash]
  else:
    # Row 1's id on row 0's pair: a duplicate of row 0's pair, but not what row 1's id names.
    clash = dict(rows[0], question_id=rows[1]["question_id"])
    lines = [rows[0], rows[1], clash]
  path = _write(str(tmp_path / "clash.jsonl"), [json.dumps(r) for r in lines])
  with pytest.raises(BadRecordError, match=fr"clash\.jsonl: record line {len(lines)}: field "
                                           "'question_id': id .* already used by .*clash.jsonl "
                                           "line 1 for a different pair" if order == "tie_first"
                     else r"line 2 for a different pair"):
    readers.read_chatbot_arena(path)
  _, stats = readers.read_chatbot_arena(path, skip_bad=True)
  assert stats.bad_reasons == {"duplicate_id": 1}
  # The same battle with its sides swapped under the same id is a duplicate, not a reuse.
  swapped = dict(rows[0], model_a=rows[0]["model_b"], model_b=rows[0]["model_a"],
                 conversation_a=rows[0]["conversation_b"], conversation_b=rows[0]["conversation_a"],
                 winner="model_b")
  path = _write(str(tmp_path / "swap.jsonl"), [json.dumps(rows[0]), json.dumps(swapped)])
  examples, stats = readers.read_chatbot_arena(path)
  assert examples == ARENA_EXPECTED[:1] and stats.duplicates_dropped == 1


def test_prepare_names_the_file_and_line_of_unencodable_text(tmp_path):
  from t5align.data import prepare  # pylint: disable=g-import-not-at-top
  manual = tmp_path / "manual" / "helpful-base"
  train = _write(str(manual / "train.jsonl"),
                 [_hh_line("a?"), _hh_line("b?", good="\ud800"), _hh_line("c?")])
  _write(str(manual / "test.jsonl"), [_hh_line("d?")])
  # Before tfds sees the text (it used to die there with a UnicodeEncodeError naming nothing).
  with pytest.raises(BadRecordError, match=re.escape(train) + r": record line 2: field 'chosen'"):
    prepare.prepare(dataset="hh_helpful", manual_dir=str(manual), data_dir=str(tmp_path / "a"))


# ------------------------------------------------------------------------- fuzz
# Random records in each public schema, with the expected example worked out here
# from the parts generated (the documented prompt formats and rules), never by the
# reader's helpers; a quarter are damaged in one of many ways, each with the reason
# the docs give for it.

FUZZ_RECORDS = 2000
_CHARS = "abcxyz ABC 019 éüßñ 日本語 😀💩 \"\\/' \t\n {}[]:,"
_PADS = ("", " ", "  ", "\n", " \t\n ")


def _text(rng, n=12):
  return "".join(rng.choice(_CHARS) for _ in range(rng.randrange(n)))


def _core(rng, tag, i):
  """Text that does not start or end with whitespace, unique per (tag, i)."""
  return f"{tag}{i} {_text(rng)} {i}"


def _padded(rng, text):
  return rng.choice(_PADS) + text + rng.choice(_PADS)


def _fuzz_tldr(rng, i, where):
  sub, title, post = _text(rng, 8) or "x", _text(rng), _text(rng, 30)
  a, b = _core(rng, "a", i), _core(rng, "b", i)
  choice = rng.randrange(2)
  info = {"id": f"t3_{i}", "post": post, "title": title, "subreddit": sub, "site": None}
  if rng.random() < 0.1:  # a CNN/DM item: validated, then dropped
    info = {"id": f"cnn_{i}", "article": post, "site": "cnn"}
  record = {"info": info, "choice": choice, "worker": f"w{i % 7}", "batch": "batch3",
            "split": "train", "extra": {"confidence": rng.randrange(1, 10)},
            "summaries": [{"text": _padded(rng, a), "policy": "ref", "note": None},
                          {"text": _padded(rng, b), "policy": "sup", "note": None}]}
  if "article" in info:
    return record, ("dropped", "no_post")
  return record, PreferenceExample(
      f"SUBREDDIT: r/{sub}\nTITLE: {title}\nPOST: {post}\nTL;DR:", a, b,
      1.0 if choice == 0 else 0.0, "tldr", "human", f"tldr:{where}")


def _fuzz_hh(rng, i, where):
  turns = "".join(f"\n\nHuman: {_text(rng)}\n\nAssistant: {_text(rng)}"
                  for _ in range(rng.randrange(3)))
  prompt = f"{turns}\n\nHuman: q{i} {_text(rng)}\n\nAssistant:"
  chosen, rejected = _core(rng, "c", i), _core(rng, "r", i)
  record = {"chosen": prompt + _padded(rng, chosen), "rejected": prompt + _padded(rng, rejected)}
  example_id = f"hh_helpful:{where}"
  if hashlib.sha256(example_id.encode()).digest()[0] & 1:  # the documented order rule
    expected = PreferenceExample(prompt, rejected, chosen, 0.0, "hh_helpful", "human", example_id)
  else:
    expected = PreferenceExample(prompt, chosen, rejected, 1.0, "hh_helpful", "human", example_id)
  return record, expected


def _fuzz_arena(rng, i, where):
  del where  # arena ids come from the record
  question_id = f"{rng.getrandbits(96):024x}{i:08x}"
  prompt, a, b = _core(rng, "p", i), _core(rng, "a", i), _core(rng, "b", i)
  turn = 1 if rng.random() < 0.85 else 2
  sides = []
  for response in (a, b):
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _padded(rng, response)}]
    if turn == 2:
      messages += [{"role": "user", "content": _text(rng)},
                   {"role": "assistant", "content": _core(rng, "t", i)}]
    sides.append(messages)
  winner = rng.choice(["model_a", "model_b", "model_a", "model_b", "tie", "tie (bothbad)"])
  record = {"question_id": question_id, "model_a": "vicuna-13b", "model_b": "koala-13b",
            "winner": winner, "judge": f"arena_user_{i}", "conversation_a": sides[0],
            "conversation_b": sides[1], "turn": turn, "anony": True, "language": "English",
            "tstamp": 1682351591.1322, "openai_moderation": {"categories": {"hate": False},
                                                             "flagged": False},
            "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.01}}}
  if turn > 1:
    return record, ("multi_turn", None)
  if winner.startswith("tie"):
    return record, ("tie", None)
  return record, PreferenceExample(prompt, a, b, 1.0 if winner == "model_a" else 0.0,
                                   "chat_arena", "human", f"chat_arena:{question_id}")


def _set(record, path, value):
  node = record
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value


def _append(record, path, suffix):
  node = record
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] += suffix


def _deep(rng):
  """A placeholder that ``_nest`` turns into lists nested past MAX_JSON_DEPTH, up to 1200 deep
  (json.dumps itself cannot write that)."""
  return f"@deep{rng.randrange(readers.MAX_JSON_DEPTH + 1, 1200)}@"


def _nest(line):
  return re.sub(r'"@deep(\d+)@"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), line)


# Per reader: (make, record-level damages as (function(rng, record), reason)).
_FUZZ = {
    "tldr": (_fuzz_tldr, [
        (lambda rng, r: r.pop("summaries"), "missing_field"),
        (lambda rng, r: r.pop("choice"), "missing_field"),
        (lambda rng, r: _set(r, ["choice"], "0"), "wrong_type"),
        (lambda rng, r: _set(r, ["choice"], 2), "bad_choice"),
        (lambda rng, r: _set(r, ["summaries", 1, "text"], rng.choice(_PADS)), "empty_response"),
        (lambda rng, r: _append(r, ["summaries", 0, "text"], "\ud800"), "bad_encoding"),
        (lambda rng, r: _set(r, ["worker"], "w\udfff"), "bad_encoding"),
        (lambda rng, r: _set(r, ["extra"], _deep(rng)), "too_deep"),
        (lambda rng, r: _set(r, ["summaries"], r["summaries"] * 2), "bad_summaries"),
    ]),
    "hh": (_fuzz_hh, [
        (lambda rng, r: r.pop("rejected"), "missing_field"),
        (lambda rng, r: _set(r, ["chosen"], [r["chosen"]]), "wrong_type"),
        (lambda rng, r: _set(r, ["chosen"], r["chosen"].rsplit("Assistant:", 1)[0]
                             + "Assistant:" + rng.choice(_PADS)), "empty_response"),
        (lambda rng, r: _set(r, ["rejected"], "\n\nHuman: other?\n\nAssistant: no"),
         "prompt_mismatch"),
        (lambda rng, r: _set(r, ["rejected"], r["rejected"].replace("\n\nAssistant:", "\n\n")),
         "no_assistant_turn"),
        (lambda rng, r: _append(r, ["chosen"], "\udc00"), "bad_encoding"),
        (lambda rng, r: _set(r, ["note"], {"x": _deep(rng)}), "too_deep"),
    ]),
    "arena": (_fuzz_arena, [
        (lambda rng, r: r.pop("conversation_b"), "missing_field"),
        (lambda rng, r: r.pop("question_id"), "missing_field"),
        (lambda rng, r: _set(r, ["turn"], "1"), "wrong_type"),
        (lambda rng, r: _set(r, ["winner"], "model_c"), "unknown_winner"),
        (lambda rng, r: _set(r, ["conversation_b", 1, "content"], " "), "empty_response"),
        (lambda rng, r: _set(r, ["conversation_b", 0, "content"], "other"), "prompt_mismatch"),
        (lambda rng, r: _set(r, ["conversation_a", 0, "role"], "assistant"), "bad_conversation"),
        (lambda rng, r: _append(r, ["conversation_a", 1, "content"], "\udbff"), "bad_encoding"),
        (lambda rng, r: _set(r, ["judge"], "\ud800x"), "bad_encoding"),
        (lambda rng, r: _set(r, ["openai_moderation"], _deep(rng)), "too_deep"),
    ]),
}


def _line_damage(rng, line, record):
  """(damaged JSON line, reason) for damage below the record level."""
  kind = rng.randrange(4)
  if kind == 0:
    key = rng.choice(sorted(record))
    return line[:-1] + f", {json.dumps(key)}: {json.dumps(record[key])}}}", "duplicate_key"
  if kind == 1:
    return line[:rng.randrange(1, len(line))], "malformed_json"
  if kind == 2:
    return json.dumps([record]), "not_an_object"
  return None, "bad_encoding"  # raw bytes, made by the caller


@pytest.mark.parametrize("kind, seed", [("tldr", 1), ("hh", 2), ("arena", 3)])
def test_fuzzed_records_read_as_expected_or_are_counted_bad(tmp_path, kind, seed):
  make, damages = _FUZZ[kind]
  rng = random.Random(seed)
  name = {"tldr": "fuzz/tldr.jsonl", "hh": "helpful-base/fuzz.jsonl.gz",
          "arena": "fuzz/arena.jsonl"}[kind]
  stem = name.split(".")[0]
  lines, expected, drops, reasons = [], [], collections.Counter(), collections.Counter()
  first_bad = None
  for i in range(FUZZ_RECORDS):
    if rng.random() < 0.1:
      lines.append(b"")  # blank lines still count
    number = len(lines) + 1
    record, want = make(rng, i, f"{stem}:{number}")
    damage = rng.random() < 0.25
    reason = None
    if damage and rng.random() < 0.6:
      function, reason = rng.choice(damages)
      function(rng, record)
    # Both ways JSON writers spell non-ASCII text: \u escapes or raw UTF-8.
    line = _nest(json.dumps(record, ensure_ascii=rng.random() < 0.5))
    if damage and reason is None:
      line, reason = _line_damage(rng, line, record)
      if line is None:
        raw = _nest(json.dumps(record)).encode()
        cut = rng.randrange(len(raw))
        raw = raw[:cut] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]) + raw[cut:]
    if line is not None:
      raw = line.encode("utf-8", "surrogatepass")
    lines.append(raw)
    if damage:
      reasons[reason] += 1
      first_bad = first_bad or number
    elif isinstance(want, PreferenceExample):
      expected.append(want)
    else:
      drops[want[1] if want[0] == "dropped" else want[0]] += 1
  path = str(tmp_path / name)
  os.makedirs(os.path.dirname(path))
  with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")

  with pytest.raises(BadRecordError) as info:
    READ[kind](path)
  assert (info.value.path, info.value.record) == (path, f"line {first_bad}")
  examples, stats = READ[kind](path, skip_bad=True)
  assert examples == expected
  assert stats.bad_reasons == reasons and stats.skipped_bad == sum(reasons.values())
  assert stats.read == FUZZ_RECORDS and stats.duplicates_dropped == 0
  assert (stats.ties_dropped, stats.multi_turn_dropped, dict(stats.dropped)) == (
      drops.pop("tie", 0), drops.pop("multi_turn", 0), dict(drops))
  assert len(expected) > FUZZ_RECORDS // 3 and len(reasons) >= 8  # the mix covers much
