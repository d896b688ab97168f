"""Tests of the miniature world: determinism, splits, labels, the oracle and its features."""

import dataclasses
import hashlib
import json
import math
import pathlib

import numpy as np
import pytest

from t5align.data import mini_world
from t5align.data.mini_world import MiniWorld, MiniWorldConfig
from t5align.data.schema import PreferenceExample

# Nouns cat, river, fox (in that order); modifiers big, old, wet; fillers the, near, and, a.
PROMPT = "summarize: the big cat near old wet river and a fox ."
PERFECT = "cat river fox ."


@pytest.fixture(scope="module")
def world():
  return MiniWorld()


def _fingerprint(examples):
  text = json.dumps([e.to_dict() for e in examples], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _independent_probability(prompt, a, b, temperature):
  delta = mini_world.oracle_quality(prompt, a) - mini_world.oracle_quality(prompt, b)
  return 1.0 / (1.0 + math.exp(-delta / temperature))


def test_same_config_same_data_and_seed_matters():
  config = MiniWorldConfig(num_train=300, num_validation=100)
  first, second = MiniWorld(config), MiniWorld(config)
  for split in mini_world.SPLITS:
    assert first.d_initial(split) == second.d_initial(split)
    assert first.prompts(split) == second.prompts(split)
  other = MiniWorld(dataclasses.replace(config, seed=1))
  assert not set(other.prompts("train")) & set(first.prompts("train"))


def test_pinned_fingerprint():
  # Guards "identical data across machines and numpy versions": if this fails
  # without an intended change to the generator, the random streams moved.
  examples = MiniWorld(MiniWorldConfig(num_train=0, num_validation=200)).d_initial("validation")
  assert _fingerprint(examples) == "3f13a0ade11ba7a06c9de93570f499ed890dc7890b6f6b007833e21e8812c2d2"


def test_growing_a_split_appends_and_leaves_the_rest():
  small = MiniWorld(MiniWorldConfig(num_train=100, num_validation=50))
  large = MiniWorld(MiniWorldConfig(num_train=250, num_validation=50))
  assert large.d_initial("validation") == small.d_initial("validation")
  assert large.d_initial("train")[:100] == small.d_initial("train")


def test_sizes_and_fields():
  config = MiniWorldConfig(num_train=123, num_validation=45)
  world = MiniWorld(config)
  ids = set()
  for split, size in (("train", 123), ("validation", 45)):
    examples = world.d_initial(split)
    assert len(examples) == size
    assert world.prompts(split) == [e.prompt for e in examples]
    for record, e in enumerate(examples):
      assert (e.task, e.source, e.step) == ("mini", "human", -1)
      assert e.label in (0.0, 1.0)
      assert e.response_a != e.response_b
      assert PreferenceExample.from_dict(e.to_dict(), record=record) == e
      ids.add(e.example_id)
  assert len(ids) == 123 + 45


def test_default_sizes_and_lengths(world):
  assert len(world.d_initial("train")) == 3000
  assert len(world.d_initial("validation")) == 500
  prompt_words = [len(p.split()) for p in world.prompts("train")]
  response_words = [len(r.split()) for e in world.d_initial("train") for r in (e.response_a, e.response_b)]
  # Short enough for tiny models on two CPU cores (SentencePiece adds about one token).
  assert 5 <= min(prompt_words) and max(prompt_words) <= 26
  assert 1 <= min(response_words) and max(response_words) <= 14


def test_splits_share_no_prompts(world):
  train, validation = world.prompts("train"), world.prompts("validation")
  assert len(set(train)) == len(train)
  assert len(set(validation)) == len(validation)
  assert not set(train) & set(validation)


def test_words_belong_to_the_language(world):
  lexicon = set(mini_world.LEXICON)
  for e in world.d_initial("validation"):
    assert e.prompt.startswith(mini_world.PROMPT_PREFIX + " ")
    for text in (e.prompt[len(mini_world.PROMPT_PREFIX):], e.response_a, e.response_b):
      assert set(text.split()) <= lexicon


def test_labels_are_balanced(world):
  examples = world.d_initial("train") + world.d_initial("validation")
  n = len(examples)
  labels = np.array([e.label for e in examples])
  # 4 standard errors of a fair coin's mean.
  assert abs(labels.mean() - 0.5) < 4 * 0.5 / math.sqrt(n)
  probs = np.array([_independent_probability(e.prompt, e.response_a, e.response_b, 0.7)
                    for e in examples])
  # Random order makes P(a preferred) symmetric about 1/2: 4 standard errors of its mean.
  assert abs(probs.mean() - 0.5) < 4 * probs.std() / math.sqrt(n)


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_label_noise_follows_the_configured_temperature(temperature):
  world = MiniWorld(MiniWorldConfig(num_train=3000, num_validation=0, label_temperature=temperature))
  examples = world.d_initial("train")
  probs = np.array([_independent_probability(e.prompt, e.response_a, e.response_b, temperature)
                    for e in examples])
  labels = np.array([e.label for e in examples])
  decided = probs != 0.5
  # Noise rate: labels against the oracle's better response, expected min(p, 1 - p) per pair.
  flipped = np.where(probs[decided] > 0.5, labels[decided] == 0.0, labels[decided] == 1.0)
  expected = np.minimum(probs, 1 - probs)[decided]
  sigma = math.sqrt(np.sum(expected * (1 - expected))) / decided.sum()
  assert abs(flipped.mean() - expected.mean()) < 4 * sigma
  # Calibration: within each band of p the labels' mean matches p (4 standard errors).
  for lo, hi in ((0.0, 0.2), (0.2, 0.45), (0.55, 0.8), (0.8, 1.0)):
    band = (probs >= lo) & (probs < hi)
    if band.sum() < 50:
      continue
    sigma = math.sqrt(np.sum(probs[band] * (1 - probs[band]))) / band.sum()
    assert abs(labels[band].mean() - probs[band].mean()) < 4 * sigma + 1e-9, (lo, hi)


def test_bayes_agreement_is_in_the_target_range(world):
  for split in mini_world.SPLITS:
    examples = world.d_initial(split)
    probs = np.array([_independent_probability(e.prompt, e.response_a, e.response_b, 0.7)
                      for e in examples])
    bayes = world.bayes_agreement(split)
    assert bayes == pytest.approx(np.mean(np.maximum(probs, 1 - probs)), abs=1e-12)
    # A strong learned preference model lands a few points below this ceiling,
    # near the 70-80% held-out agreement of models on the real data.
    assert 0.78 <= bayes <= 0.84, (split, bayes)


def test_oracle_sign_classifier_reaches_the_bayes_agreement(world):
  examples = world.d_initial("train")
  probs = np.array([world.oracle_preference_probability(e.prompt, e.response_a, e.response_b)
                    for e in examples])
  labels = np.array([e.label for e in examples])
  correct = np.where(probs > 0.5, labels == 1.0, np.where(probs < 0.5, labels == 0.0, 0.5))
  bayes = world.bayes_agreement("train")
  assert abs(correct.mean() - bayes) < 4 * math.sqrt(bayes * (1 - bayes) / len(examples))


@pytest.mark.parametrize("response, features, quality", [
    (PERFECT, dict(coverage=1.0), 3.0),
    ("cat fox .", dict(coverage=2 / 3), 2.0),
    ("river cat fox .", dict(coverage=1.0, order_inversions=1 / 3), 3.0 - 1 / 3),
    ("fox river cat .", dict(coverage=1.0, order_inversions=1.0), 2.0),
    ("cat river fox dog .", dict(coverage=1.0, hallucinations=1), 1.5),
    ("cat dog fox .", dict(coverage=2 / 3, hallucinations=1), 0.5),
    ("cat river fox fox .", dict(coverage=1.0, repetitions=1), 2.0),
    ("cat dog dog river fox .", dict(coverage=1.0, hallucinations=2, repetitions=1), -1.0),
    ("big cat river fox .", dict(coverage=1.0, padding=1), 2.5),
    ("the cat river fox .", dict(coverage=1.0, padding=1), 2.5),
    ("big big cat river fox .", dict(coverage=1.0, padding=1, repetitions=1), 1.5),
    ("cat river fox", dict(coverage=1.0, bad_ending=True), 2.0),
    ("cat . river fox .", dict(coverage=1.0, bad_ending=True), 2.0),
    ("cat river fox . .", dict(coverage=1.0, bad_ending=True), 2.0),
    (".", dict(coverage=0.0, bad_ending=True), -1.0),
    ("", dict(coverage=0.0, bad_ending=True), -1.0),
    ("summarize: cat river fox .", dict(coverage=1.0, hallucinations=1), 1.5),
])
def test_oracle_features_and_quality_by_hand(response, features, quality):
  expected = dict(coverage=0.0, order_inversions=0.0, hallucinations=0, repetitions=0, padding=0,
                  bad_ending=False)
  expected.update(features)
  got = dataclasses.asdict(mini_world.oracle_features(PROMPT, response))
  assert got == pytest.approx(expected)
  assert mini_world.oracle_quality(PROMPT, response) == pytest.approx(quality)
  if response != PERFECT:
    # Every documented flaw moves quality down from the perfect summary.
    assert mini_world.oracle_quality(PROMPT, response) < mini_world.oracle_quality(PROMPT, PERFECT)


def test_quality_peaks_at_the_right_length():
  by_length = ["cat .", "cat river .", "cat river fox .", "cat river fox fox .",
               "cat river fox fox fox ."]
  qualities = [mini_world.oracle_quality(PROMPT, r) for r in by_length]
  assert int(np.argmax(qualities)) == 2
  assert qualities == sorted(qualities[:3]) + sorted(qualities[3:], reverse=True)


def test_oracle_rejects_foreign_prompts():
  with pytest.raises(ValueError, match="not a mini-world prompt"):
    mini_world.oracle_quality("TL;DR: the cat", "cat .")


def test_preference_probability():
  world = MiniWorld()
  assert world.oracle_preference_probability(PROMPT, PERFECT, PERFECT) == 0.5
  # Quality 3.0 against 2.0 at temperature 0.7: sigmoid(1 / 0.7) by hand.
  assert world.oracle_preference_probability(PROMPT, PERFECT, "cat fox .") == pytest.approx(
      0.8066786, abs=1e-6)
  p = world.oracle_preference_probability(PROMPT, "big cat river fox .", "cat dog fox .")
  q = world.oracle_preference_probability(PROMPT, "cat dog fox .", "big cat river fox .")
  assert p + q == pytest.approx(1.0)


def test_behaviour_data_shows_every_flaw(world):
  pairs = [(e.prompt, r) for e in world.d_initial("train") for r in (e.response_a, e.response_b)]
  features = [mini_world.oracle_features(p, r) for p, r in pairs]
  for name in ("order_inversions", "hallucinations", "repetitions", "padding", "bad_ending"):
    rate = np.mean([float(getattr(f, name)) > 0 for f in features])
    # Each flaw is common enough for a preference model to see it, rare enough to be a flaw.
    assert 0.05 <= rate <= 0.5, (name, rate)
  coverage = np.array([f.coverage for f in features])
  assert 0.05 <= np.mean(coverage == 1.0) and np.mean(coverage < 0.5) >= 0.05


def test_shallow_cues_hold_on_the_data_but_not_off_it(world):
  """The blind spots a small proxy model can learn and an online policy can exploit."""
  examples = world.d_initial("train")

  def cue_agreement(cue):
    agree = [(cue(e.prompt, e.response_a) > cue(e.prompt, e.response_b)) == (e.label == 1.0)
             for e in examples if cue(e.prompt, e.response_a) != cue(e.prompt, e.response_b)]
    return np.mean(agree)

  def length(prompt, response):
    return len(response.split())

  def post_noun_tokens(prompt, response):
    post = set(prompt.split())
    return sum(w in post and w in mini_world.NOUNS for w in response.split())

  # On the behaviour data, longer responses and more post-noun tokens usually win...
  assert cue_agreement(length) > 0.55
  assert cue_agreement(post_noun_tokens) > 0.65
  # ...but maximising either cue beyond the data (repeating facts, padding,
  # hallucinating) is what the oracle punishes.
  world_p = world.oracle_preference_probability
  for exploit in ("cat cat river river fox fox .", "big cat old wet river fox .",
                  "cat river fox dog bear ."):
    assert length(PROMPT, exploit) > length(PROMPT, PERFECT)
    assert world_p(PROMPT, PERFECT, exploit) > 0.8, exploit


def test_config_validation_names_the_field():
  for kwargs, field in ((dict(num_train=-1), "num_train"), (dict(min_facts=1), "min_facts"),
                        (dict(max_facts=2), "max_facts"), (dict(label_temperature=0.0), "label_temperature"),
                        (dict(swap_rate=1.5), "swap_rate"), (dict(max_modifiers=5), "max_modifiers")):
    with pytest.raises(ValueError, match=f"MiniWorldConfig.{field}"):
      MiniWorldConfig(**kwargs)


def test_unknown_split():
  with pytest.raises(ValueError, match="unknown mini-world split 'test'"):
    MiniWorld(MiniWorldConfig(num_train=1, num_validation=1)).d_initial("test")


def test_no_stage_reads_the_oracle():
  """The oracle rule: only this module and report code (t5align/eval/) may use it."""
  package = pathlib.Path(mini_world.__file__).resolve().parents[1]
  names = ("oracle_quality", "oracle_features", "oracle_preference_probability", "bayes_agreement")
  offenders = []
  for path in package.rglob("*.py"):
    relative = path.relative_to(package).as_posix()
    if relative == "data/mini_world.py" or relative.startswith("eval/"):
      continue
    text = path.read_text()
    offenders += [f"t5align/{relative}: {name}" for name in names if name in text]
  assert not offenders, f"the mini-world oracle is for D_initial and reports only: {offenders}"


def test_rambling_writers_repeat_words_and_leave_other_worlds_unchanged():
  plain = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=400, num_validation=10))
  zero = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=400, num_validation=10,
                                                         rambling_rate=0.0))
  assert plain.d_initial("train") == zero.d_initial("train")  # no draw is made at rate 0
  rambling = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=400, num_validation=10,
                                                             rambling_rate=0.5, max_rambling=4))

  def repetitions(world):
    return np.array([mini_world.oracle_features(e.prompt, r).repetitions
                     for e in world.d_initial("train") for r in (e.response_a, e.response_b)])

  before, after = repetitions(plain), repetitions(rambling)
  # Half the responses gain 1..4 repeats (mean 2.5): about 1.25 more per response.
  assert 0.9 < after.mean() - before.mean() < 1.6
  assert (after >= 3).mean() > 0.1 and (before >= 3).mean() < 0.02
  with pytest.raises(ValueError, match="rambling_rate"):
    mini_world.MiniWorldConfig(rambling_rate=1.5)
