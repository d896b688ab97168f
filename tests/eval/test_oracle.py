"""Tests of t5align.eval.oracle (the mini world's validity columns) against hand-made cases."""

import numpy as np
import pytest

from t5align.data import mini_world
from t5align.data import vocab as vocab_lib
from t5align.eval import oracle

PROMPT = "summarize: the big cat near old wet river and a fox ."


@pytest.fixture(scope="module")
def vocabulary():
  return vocab_lib.get_vocabulary(None)


def _row(vocabulary, text, width):
  ids = list(vocabulary.encode(text)) + [1]
  return np.array(ids + [0] * (width - len(ids)), np.int32)


def test_decode_rows_stops_at_eos_and_gives_back_the_text(vocabulary):
  row = _row(vocabulary, "cat river fox .", 16)
  row[list(row).index(1) + 1] = 7  # anything after EOS is ignored
  assert oracle.decode_rows(vocabulary, row[None]) == ["cat river fox ."]
  assert oracle.decode_rows(vocabulary, _row(vocabulary, PROMPT, 40)[None]) == [PROMPT]


def test_validity_columns_by_hand(vocabulary):
  ours = ["cat river fox .", "cat cat cat river fox .", "dog ."]
  golden = ["cat fox .", "cat river fox .", "dog ."]
  prompts = np.stack([_row(vocabulary, PROMPT, 40)] * 3)
  columns, arrays = oracle.validity_columns(vocabulary)(
      prompts=prompts, policy_samples=np.stack([_row(vocabulary, t, 16) for t in ours]),
      golden_samples=np.stack([_row(vocabulary, t, 16) for t in golden]),
      margins=np.array([0.3, 0.2, -0.1]))
  q = [mini_world.oracle_quality(PROMPT, t) for t in ours]
  qg = [mini_world.oracle_quality(PROMPT, t) for t in golden]
  # Perfect beats partial (win), repeats lose to perfect (loss), identical responses tie.
  assert q[0] > qg[0] and q[1] < qg[1] and q[2] == qg[2]
  np.testing.assert_array_equal(arrays["oracle_wins"], [1.0, 0.0, 0.5])
  assert columns["oracle_win_rate"] == pytest.approx(0.5)
  assert columns["oracle_quality"] == pytest.approx(np.mean(q))
  assert columns["golden_oracle_quality"] == pytest.approx(np.mean(qg))
  assert columns["repetitions"] == pytest.approx(2 / 3)
  assert columns["hallucinations"] == pytest.approx(1 / 3)  # "dog" is not in the post
  assert columns["words"] == pytest.approx((4 + 6 + 2) / 3)
  # The judge says win, win, loss: it agrees on the first, not the second, half on the tie.
  assert columns["golden_oracle_agreement"] == pytest.approx((1 + 0 + 0.5) / 3)
