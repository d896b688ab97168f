"""Validity columns of the miniature world: the hidden oracle as a report column.

The golden PM is the study's judge; in the miniature world we can also ask
the oracle that made D_initial's labels whether the judge is being gamed.
Evaluation only: no training stage reads these numbers (the oracle rule of
``t5align.data.mini_world``). Per checkpoint, on the win-rate samples (one
policy sample ``y`` and one golden-policy sample ``y_g`` per prompt ``x``):

* ``oracle_win_rate``: mean of 1[q(y) > q(y_g)] + 1/2 * 1[q(y) = q(y_g)],
  the win rate the oracle would give (q = ``mini_world.oracle_quality``);
* ``oracle_quality``: mean q(y); ``golden_oracle_quality``: mean q(y_g);
* ``repetitions``, ``hallucinations``, ``words``: means per response of the
  oracle's features and of the word count;
* ``golden_oracle_agreement``: how often the golden PM's decision on (y, y_g)
  agrees with the oracle's order (1/2 where the oracle ties): the judge's
  validity on this checkpoint's own samples.

Samples are decoded with the study's vocabulary (prompt and response ids
before EOS), the text the oracle is defined on.
"""

import math
from typing import Sequence

import numpy as np

from t5align.data import mini_world
from t5align.models import t5


def decode_rows(vocabulary, rows: np.ndarray) -> list[str]:
  """Text of each token row: the ids before the first EOS, padding dropped."""
  texts = []
  for row in np.asarray(rows):
    ids = [int(t) for t in row]
    if t5.EOS_ID in ids:
      ids = ids[:ids.index(t5.EOS_ID)]
    texts.append(vocabulary.decode([i for i in ids if i != 0]))
  return texts


def oracle_order(quality_1: np.ndarray, quality_2: np.ndarray) -> np.ndarray:
  """The oracle's label P(1 preferred) in {1, 1/2, 0} from two quality vectors."""
  return np.where(quality_1 > quality_2, 1.0, np.where(quality_1 < quality_2, 0.0, 0.5))


def quality(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
  """Per response: oracle quality, repetitions, hallucinations and word count."""
  features = [mini_world.oracle_features(p, r) for p, r in zip(prompts, responses)]
  return {"quality": np.array([mini_world.oracle_quality(p, r)
                               for p, r in zip(prompts, responses)], np.float64),
          "repetitions": np.array([f.repetitions for f in features], np.float64),
          "hallucinations": np.array([f.hallucinations for f in features], np.float64),
          "words": np.array([len(r.split()) for r in responses], np.float64)}


def _stderr(values: np.ndarray) -> float:
  return float(np.std(values) / math.sqrt(len(values)))


def validity_columns(vocabulary):
  """The ``extra_metrics`` hook of ``evaluate.evaluate_run`` for the miniature world."""

  def columns(*, prompts, policy_samples, golden_samples, margins):
    prompt_texts = decode_rows(vocabulary, prompts)
    ours = quality(prompt_texts, decode_rows(vocabulary, policy_samples))
    golden = quality(prompt_texts, decode_rows(vocabulary, golden_samples))
    oracle_wins = oracle_order(ours["quality"], golden["quality"])
    judge = np.where(margins > 0, 1.0, np.where(margins < 0, 0.0, 0.5))
    agreement = oracle_wins * judge + (1.0 - oracle_wins) * (1.0 - judge)
    metrics = {"oracle_win_rate": float(np.mean(oracle_wins)),
               "oracle_win_rate_stderr": _stderr(oracle_wins),
               "oracle_quality": float(np.mean(ours["quality"])),
               "golden_oracle_quality": float(np.mean(golden["quality"])),
               "repetitions": float(np.mean(ours["repetitions"])),
               "hallucinations": float(np.mean(ours["hallucinations"])),
               "words": float(np.mean(ours["words"])),
               "golden_oracle_agreement": float(np.mean(agreement))}
    return metrics, {"oracle_wins": oracle_wins, "oracle_quality": ours["quality"]}

  return columns
