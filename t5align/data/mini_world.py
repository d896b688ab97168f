"""The miniature world: a seeded post -> summary task in a small synthetic language.

The real preference datasets and T5 checkpoints are downloads; the miniature world
lets the whole study run offline on two CPU cores. It has three parts:

* **Prompts.** A post is a run of clauses ``[filler] [modifier ...] noun``, e.g.
  ``"summarize: the big cat near old wet river and a fox ."``. The post's nouns
  are its key facts, in order.
* **A behaviour policy** (:meth:`MiniWorld.behaviour_response`) stands in for the
  people and models that wrote the original responses: writers of varying
  diligence copy some of the nouns, sometimes in the wrong order, sometimes with
  copied modifiers or fillers, hallucinated words, repeated words or no final
  ``"."``. A perfect summary is the post's nouns in order followed by ``"."``.
* **A hidden oracle** scores quality from several features (coverage, order,
  hallucination, repetition, padding, ending; see :func:`oracle_features`).
  D_initial's labels are Bradley-Terry draws from it, standing in for human
  raters: P(a preferred) = sigmoid((q(a) - q(b)) / label_temperature).

THE ORACLE RULE: no model or stage may read the oracle. It exists to make
D_initial and, in reports, an extra sanity column (``oracle_*`` names). Training,
relabelling, sampling and evaluation all go through learned preference models.

Every random draw comes from a numpy ``Generator`` seeded by
``SeedSequence([seed, stream, ordinal])`` and only ``random()`` / ``integers()``
are used (their streams do not depend on libm), so the same config gives the
same data on every run and machine. Prompt ``k`` and its pair depend only on
``(seed, k)``: growing ``num_train`` appends train pairs and leaves the rest
unchanged.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np

from t5align.data.schema import PreferenceExample

TASK = "mini"
SPLITS = ("train", "validation")
PROMPT_PREFIX = "summarize:"
END = "."

# Key facts: every noun of a post should be in its summary, in post order.
NOUNS = (
    "cat", "dog", "bird", "fish", "horse", "cow", "goat", "frog", "bear", "wolf",
    "fox", "owl", "bee", "duck", "mouse", "deer", "tree", "river", "hill", "rock",
    "boat", "house", "road", "field", "lake", "moon", "star", "cloud", "rain", "snow",
    "wind", "door", "bell", "lamp", "book", "cup", "key", "ship", "farm", "town",
)
# Details: faithful to the post but padding in a summary.
MODIFIERS = (
    "red", "blue", "green", "big", "small", "old", "young", "fast", "slow", "quiet",
    "loud", "happy", "sad", "wet", "dry", "warm", "cold", "dark", "bright", "tall",
)
# Function words: padding in a summary, never counted as hallucinated.
FILLERS = ("the", "a", "and", "then", "with", "near")
LEXICON = NOUNS + MODIFIERS + FILLERS + (END,)

# Oracle weights: quality = sum of weight * feature (see oracle_features).
ORACLE_WEIGHTS = {
    "coverage": 3.0,
    "order_inversions": -1.0,
    "hallucinations": -1.5,
    "repetitions": -1.0,
    "padding": -0.5,
    "bad_ending": -1.0,
}

# Independent random streams, so that changing how one thing is drawn leaves the others.
_PROMPT_STREAM = 0
_PAIR_STREAM = 1
_MAX_PAIR_TRIES = 100


@dataclasses.dataclass(frozen=True)
class MiniWorldConfig:
  """Everything that determines a miniature world; equal configs give equal data.

  The defaults are sized for the two-core CPU study. Prompts are assigned to
  splits in one seeded stream: validation takes the first ``num_validation``
  distinct prompts and train the next ``num_train``.
  """
  seed: int = 0
  num_train: int = 3000
  num_validation: int = 500
  # Key facts (nouns) per post, inclusive range.
  min_facts: int = 3
  max_facts: int = 6
  # Each clause has 0..max_modifiers modifiers (uniform) and a filler with filler_rate.
  max_modifiers: int = 2
  filler_rate: float = 0.6
  # Bradley-Terry label noise: P(a preferred) = sigmoid((q(a) - q(b)) / label_temperature).
  label_temperature: float = 0.7
  # Behaviour policy (the writers of the original responses); rates are per response.
  min_diligence: float = 0.3  # a writer copies each noun with probability diligence
  verbosity: float = 0.15  # P(copy a noun's modifier) = verbosity * diligence
  swap_rate: float = 0.2  # swap two adjacent nouns
  substitution_rate: float = 0.12  # replace a noun by one absent from the post
  insertion_rate: float = 0.08  # insert a word absent from the post
  repetition_rate: float = 0.1  # repeat a word already written
  filler_insertion_rate: float = 0.1  # insert a function word
  missing_end_rate: float = 0.1  # stop without the final "."
  # Rambling writers: with this probability a response also repeats 1..max_rambling
  # words it has already written. 0 (the default) draws nothing, so worlds made
  # without rambling are unchanged. Rambling puts long, repetitive, low-quality
  # responses into D_initial, which a golden PM must have seen to judge such text
  # when policies produce it (docs/mini_world.md, "Rambling writers").
  rambling_rate: float = 0.0
  max_rambling: int = 4

  def __post_init__(self):
    def check(ok, field, problem):
      if not ok:
        raise ValueError(f"MiniWorldConfig.{field}: {problem}")

    for name in ("seed", "num_train", "num_validation", "min_facts", "max_facts", "max_modifiers",
                 "max_rambling"):
      value = getattr(self, name)
      check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            name, f"expected a non-negative integer, got {value!r}")
    check(self.min_facts >= 2, "min_facts", f"expected >= 2 (order needs two facts), got {self.min_facts}")
    check(self.max_facts >= self.min_facts, "max_facts",
          f"expected >= min_facts={self.min_facts}, got {self.max_facts}")
    check(self.max_facts <= len(NOUNS) // 2, "max_facts",
          f"expected <= {len(NOUNS) // 2} so that absent nouns remain, got {self.max_facts}")
    check(self.max_facts * self.max_modifiers <= len(MODIFIERS), "max_modifiers",
          f"max_facts * max_modifiers must be <= {len(MODIFIERS)} (modifiers are distinct per post)")
    check(self.label_temperature > 0, "label_temperature",
          f"expected > 0, got {self.label_temperature}")
    for name in ("filler_rate", "min_diligence", "verbosity", "swap_rate", "substitution_rate",
                 "insertion_rate", "repetition_rate", "filler_insertion_rate", "missing_end_rate",
                 "rambling_rate"):
      value = getattr(self, name)
      check(0.0 <= value <= 1.0, name, f"expected a probability in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class OracleFeatures:
  """What the oracle measures in one response to one post (for reports only).

  ``body`` below means the response's words other than ``"."``.
  """
  coverage: float  # fraction of the post's nouns that the body mentions
  order_inversions: float  # fraction of mentioned noun pairs out of post order
  hallucinations: int  # body words absent from the post (fillers excepted)
  repetitions: int  # body words equal to an earlier body word
  padding: int  # first mentions of post words that are not nouns, and fillers
  bad_ending: bool  # not exactly one "." at the very end of a non-empty body


def _post_words(prompt: str) -> list[str]:
  if not prompt.startswith(PROMPT_PREFIX):
    raise ValueError(f"not a mini-world prompt (expected prefix {PROMPT_PREFIX!r}): {prompt!r}")
  return prompt[len(PROMPT_PREFIX):].split()


def oracle_features(prompt: str, response: str) -> OracleFeatures:
  """The oracle's features of ``response`` to ``prompt``. REPORTS AND SANITY CHECKS ONLY.

  No model or stage may call this; see the module docstring. Any text is accepted
  as a response (policy samples included); only the prompt must be a mini-world one.
  """
  post = _post_words(prompt)
  post_set = set(post)
  noun_rank = {}
  for word in post:
    if word in NOUNS and word not in noun_rank:
      noun_rank[word] = len(noun_rank)
  words = response.split()
  body = [w for w in words if w != END]
  bad_ending = not body or words[-1] != END or words.count(END) != 1

  seen, mentioned = set(), []
  hallucinations = repetitions = padding = 0
  for word in body:
    if word not in post_set and word not in FILLERS:
      hallucinations += 1
    if word in seen:
      repetitions += 1
      continue
    seen.add(word)
    if word in noun_rank:
      mentioned.append(noun_rank[word])
    elif word in post_set or word in FILLERS:
      padding += 1

  pairs = len(mentioned) * (len(mentioned) - 1) // 2
  inversions = sum(1 for i in range(len(mentioned)) for j in range(i + 1, len(mentioned))
                   if mentioned[i] > mentioned[j])
  return OracleFeatures(
      coverage=len(mentioned) / len(noun_rank) if noun_rank else 0.0,
      order_inversions=inversions / pairs if pairs else 0.0,
      hallucinations=hallucinations,
      repetitions=repetitions,
      padding=padding,
      bad_ending=bad_ending)


def oracle_quality(prompt: str, response: str) -> float:
  """The hidden quality of ``response``: REPORTS AND SANITY CHECKS ONLY (see module docstring).

  A perfect summary (every noun of the post, in order, then ".") scores 3.0; each
  flaw subtracts its weight in ``ORACLE_WEIGHTS``.
  """
  features = oracle_features(prompt, response)
  return sum(weight * float(getattr(features, name)) for name, weight in ORACLE_WEIGHTS.items())


def _sigmoid(x: float) -> float:
  if x >= 0:
    return 1.0 / (1.0 + math.exp(-x))
  z = math.exp(x)
  return z / (1.0 + z)


def _generator(seed: int, stream: int, ordinal: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, ordinal])))


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
  return items[int(rng.integers(len(items)))]


def _sample_without_replacement(rng: np.random.Generator, items: Sequence[str], k: int) -> list[str]:
  # A partial Fisher-Yates shuffle on integers() only (see the module docstring on determinism).
  pool = list(items)
  for i in range(k):
    j = i + int(rng.integers(len(pool) - i))
    pool[i], pool[j] = pool[j], pool[i]
  return pool[:k]


class MiniWorld:
  """One miniature world: prompts, the behaviour policy, D_initial and the oracle.

  Splits are built lazily and cached; every call returns fresh lists.
  """

  def __init__(self, config: MiniWorldConfig = MiniWorldConfig()):
    self.config = config
    self._splits = {}

  def prompts(self, split: str) -> list[str]:
    """The split's prompts, one per D_initial pair, in example order."""
    return list(self._split(split)[0])

  def d_initial(self, split: str) -> list[PreferenceExample]:
    """The human-labelled pairs: task 'mini', source 'human', hard Bradley-Terry labels.

    The two responses are behaviour draws (the second redrawn until it differs)
    put in random order, so labels are balanced.
    """
    return list(self._split(split)[1])

  def behaviour_response(self, prompt: str, rng: np.random.Generator) -> str:
    """One response by a random writer of the original data (never reads the oracle)."""
    c = self.config
    post = _post_words(prompt)
    facts, modifiers_of, current = [], {}, []
    for word in post:
      if word in NOUNS:
        facts.append(word)
        modifiers_of[word] = [w for w in current if w in MODIFIERS]
        current = []
      else:
        current.append(word)
    absent_nouns = [w for w in NOUNS if w not in post]
    absent_words = absent_nouns + [w for w in MODIFIERS if w not in post]

    # Diligent writers cover more facts and also copy more modifiers: length goes
    # with coverage in this data although the oracle charges for padding.
    diligence = c.min_diligence + (1.0 - c.min_diligence) * math.sqrt(rng.random())
    kept = [w for w in facts if rng.random() < diligence]
    if not kept:
      kept = [_pick(rng, facts)]
    if len(kept) >= 2 and rng.random() < c.swap_rate:
      i = int(rng.integers(len(kept) - 1))
      kept[i], kept[i + 1] = kept[i + 1], kept[i]
    if rng.random() < c.substitution_rate:
      kept[int(rng.integers(len(kept)))] = _pick(rng, absent_nouns)

    body = []
    for noun in kept:
      for modifier in modifiers_of.get(noun, []):
        if rng.random() < c.verbosity * diligence:
          body.append(modifier)
      body.append(noun)
    if rng.random() < c.insertion_rate:
      body.insert(int(rng.integers(len(body) + 1)), _pick(rng, absent_words))
    if rng.random() < c.filler_insertion_rate:
      body.insert(int(rng.integers(len(body) + 1)), _pick(rng, FILLERS))
    if rng.random() < c.repetition_rate:
      # Writers who repeat themselves mostly restate a fact they have just written.
      i = int(rng.integers(len(body)))
      body.insert(i + 1, body[i])
    if c.rambling_rate and rng.random() < c.rambling_rate:
      for _ in range(1 + int(rng.integers(max(c.max_rambling, 1)))):
        i = int(rng.integers(len(body)))
        body.insert(i + 1 + int(rng.integers(len(body) - i)), body[i])  # anywhere after it
    if rng.random() >= c.missing_end_rate:
      body.append(END)
    return " ".join(body)

  def oracle_preference_probability(self, prompt: str, response_a: str, response_b: str) -> float:
    """P(a preferred) under the Bradley-Terry oracle. REPORTS AND SANITY CHECKS ONLY."""
    delta = oracle_quality(prompt, response_a) - oracle_quality(prompt, response_b)
    return _sigmoid(delta / self.config.label_temperature)

  def bayes_agreement(self, split: str) -> float:
    """Expected agreement of the best possible classifier with the split's noisy labels.

    It is the mean of max(p, 1 - p) over the pairs, p = oracle P(a preferred): the
    ceiling for any learned preference model's held-out accuracy. REPORTS ONLY.
    """
    probs = self._split(split)[2]
    return float(np.mean(np.maximum(probs, 1.0 - probs)))

  def _all_prompts(self) -> tuple[str, ...]:
    """Distinct prompts in stream order: validation first, then train."""
    c = self.config
    wanted = c.num_validation + c.num_train
    prompts, seen, ordinal = [], set(), 0
    while len(prompts) < wanted:
      prompt = self._make_prompt(_generator(c.seed, _PROMPT_STREAM, ordinal))
      ordinal += 1
      if prompt not in seen:
        seen.add(prompt)
        prompts.append(prompt)
    return tuple(prompts)

  def _make_prompt(self, rng: np.random.Generator) -> str:
    c = self.config
    num_facts = c.min_facts + int(rng.integers(c.max_facts - c.min_facts + 1))
    nouns = _sample_without_replacement(rng, NOUNS, num_facts)
    modifier_counts = [int(rng.integers(c.max_modifiers + 1)) for _ in nouns]
    modifiers = iter(_sample_without_replacement(rng, MODIFIERS, sum(modifier_counts)))
    words = []
    for noun, count in zip(nouns, modifier_counts):
      if rng.random() < c.filler_rate:
        words.append(_pick(rng, FILLERS))
      words.extend(next(modifiers) for _ in range(count))
      words.append(noun)
    return " ".join([PROMPT_PREFIX] + words + [END])

  def _split(self, split: str) -> tuple[tuple[str, ...], tuple[PreferenceExample, ...], np.ndarray]:
    """(prompts, D_initial examples, oracle P(a preferred) per example) of one split."""
    if split not in SPLITS:
      raise ValueError(f"unknown mini-world split {split!r}; expected one of {SPLITS}")
    if split not in self._splits:
      self._splits[split] = self._build_split(split)
    return self._splits[split]

  def _build_split(self, split: str) -> tuple[tuple[str, ...], tuple[PreferenceExample, ...], np.ndarray]:
    c = self.config
    start = 0 if split == "validation" else c.num_validation
    stop = c.num_validation if split == "validation" else c.num_validation + c.num_train
    prompts = self._all_prompts()[start:stop]
    examples, probs = [], []
    for i, prompt in enumerate(prompts):
      rng = _generator(c.seed, _PAIR_STREAM, start + i)
      response_a = self.behaviour_response(prompt, rng)
      for _ in range(_MAX_PAIR_TRIES):
        response_b = self.behaviour_response(prompt, rng)
        if response_b != response_a:
          break
      else:
        raise RuntimeError(f"mini world {split} pair {i}: no two distinct responses to {prompt!r}; "
                           "the behaviour policy's config leaves it no variety")
      # Redrawing b until it differs from a favours frequent (good) responses as a;
      # a fair coin restores a random order and so balanced labels.
      if rng.random() < 0.5:
        response_a, response_b = response_b, response_a
      p = self.oracle_preference_probability(prompt, response_a, response_b)
      label = 1.0 if rng.random() < p else 0.0
      examples.append(PreferenceExample(
          prompt=prompt, response_a=response_a, response_b=response_b, label=label, task=TASK,
          source="human", example_id=f"mini-{c.seed}-{split}-{i:06d}"))
      probs.append(p)
    return tuple(prompts), tuple(examples), np.asarray(probs, dtype=np.float64)
