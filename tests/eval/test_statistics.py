"""Tests of t5align.eval.statistics: envelopes on constructed inputs, bootstrap coverage, verdicts."""

import math

import numpy as np
import pytest

from t5align.eval import statistics as st


def test_curve_sorts_by_log_kl_and_averages_ties():
  x, y = st.curve([1.0, 0.0, 1.0, float("nan")], [0.2, 0.5, 0.4, 0.9])
  np.testing.assert_array_equal(x, [0.0, 1.0])
  np.testing.assert_allclose(y, [0.5, 0.3])


def test_interpolate_is_linear_inside_and_undefined_outside():
  out = st.interpolate(np.array([0.0, 2.0]), np.array([0.0, 1.0]), np.array([-1.0, 0.5, 2.0, 3.0]))
  assert math.isnan(out[0]) and math.isnan(out[3])
  np.testing.assert_allclose(out[1:3], [0.25, 1.0])


def test_envelope_takes_the_best_run_defined_at_each_point():
  crossing = [(np.array([0.0, 1.0]), np.array([0.0, 1.0])),
              (np.array([0.0, 1.0]), np.array([1.0, 0.0]))]
  grid = np.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(st.envelope(crossing, grid), [1.0, 0.75, 0.5, 1.0])
  # Runs covering different ranges: each point takes only the runs that reach it.
  apart = [(np.array([0.0, 1.0]), np.array([0.2, 0.2])), (np.array([2.0, 3.0]), np.array([0.6, 0.6]))]
  out = st.envelope(apart, np.array([0.5, 1.5, 2.5]))
  assert out[0] == 0.2 and math.isnan(out[1]) and out[2] == 0.6


def test_matched_difference_of_the_docstring_example():
  a = [(np.array([0.0, 1.0]), np.array([0.3, 0.5]))]
  b = [(np.array([0.5, 2.0]), np.array([0.2, 0.4]))]
  # On [0.5, 1]: (0.3 + 0.2 x) - (0.2 + 0.2 (x - 0.5) / 1.5): from 0.2 to 0.2333, mean 0.21667.
  assert st.matched_difference(a, b) == pytest.approx((0.2 + 0.7 / 3) / 2, abs=1e-12)
  assert st.shared_range(a, b) == (0.5, 1.0)
  # No shared range: no comparison.
  assert st.matched_difference(a, [(np.array([1.5, 2.0]), np.array([0.1, 0.1]))]) is None


def test_verdict_rules():
  assert st.verdict("greater", 0.1, (0.02, 0.2)) == st.REPRODUCED
  assert st.verdict("greater", -0.1, (-0.2, -0.02)) == st.NOT_REPRODUCED
  assert st.verdict("greater", 0.1, (-0.01, 0.2)) == st.INCONCLUSIVE
  assert st.verdict("less", -0.1, (-0.2, -0.02)) == st.REPRODUCED
  assert st.verdict("similar", 0.0, (-0.04, 0.04)) == st.REPRODUCED
  assert st.verdict("similar", 0.1, (0.06, 0.2)) == st.NOT_REPRODUCED
  assert st.verdict("similar", 0.03, (-0.01, 0.07)) == st.INCONCLUSIVE
  assert st.verdict("greater", None, None) == st.INCONCLUSIVE
  with pytest.raises(ValueError, match="unknown claim kind"):
    st.verdict("bigger", 0.1, (0.0, 0.2))


KL = np.array([0.5, 1.0, 2.0, 4.0])  # per-checkpoint KL, the same on every prompt
TRUE_A = np.array([0.30, 0.45, 0.50, 0.40])
TRUE_B = np.array([0.30, 0.35, 0.42, 0.38])
PROMPTS = 300


def _run(name, method, truth, rng):
  wins = (rng.random((len(truth), PROMPTS)) < truth[:, None]).astype(np.float64)
  return st.Run(name=name, method=method, seed=0, steps=np.arange(1, len(truth) + 1),
                arrays={"wins": wins, "kl_values": np.repeat(KL[:, None], 40, axis=1)})


def _statistic(groups):
  return st.matched_difference([r.curve() for r in groups["a"]], [r.curve() for r in groups["b"]])


def test_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
  # The statistic is linear in the win rates (KL is exact), so its expectation is the
  # matched difference of the true curves.
  truth = st.matched_difference([(np.log(KL), TRUE_A)], [(np.log(KL), TRUE_B)])
  rng = np.random.default_rng(0)
  covered, widths, values = 0, [], []
  trials = 60
  for trial in range(trials):
    runs = [_run("a", "a", TRUE_A, rng), _run("b", "b", TRUE_B, rng)]
    result = st.bootstrap(_statistic, runs, num_resamples=200, seed=trial)
    lo, hi = result["interval"]
    covered += lo <= truth <= hi
    widths.append(hi - lo)
    values.append(result["value"])
  assert 0.85 <= covered / trials <= 1.0
  # Neither too narrow nor too wide: a 95% interval spans about 3.9 standard deviations.
  ratio = np.mean(widths) / np.std(values)
  assert 2.8 < ratio < 5.5, ratio


def test_bootstrap_resamples_seeds_and_is_deterministic():
  runs = [st.Run(name=f"a{s}", method="a", seed=s, steps=np.array([1]),
                 arrays={"wins": np.full((1, 10), float(s))}) for s in range(3)]
  mean_of_runs = lambda g: float(np.mean([r.means["wins"][0] for r in g["a"]]))
  result = st.bootstrap(mean_of_runs, runs, num_resamples=400, seed=0)
  assert result["value"] == 1.0
  lo, hi = result["interval"]
  assert lo < 1.0 < hi and 0.0 <= lo and hi <= 2.0  # the seeds are the only variation
  assert st.bootstrap(mean_of_runs, runs, num_resamples=400, seed=0) == result
  fixed = st.bootstrap(mean_of_runs, runs, num_resamples=50, seed=0, resample_seeds=False)
  assert fixed["interval"] == (1.0, 1.0)


def test_bootstrap_refuses_runs_on_different_prompts():
  runs = [st.Run(name="a", method="a", seed=0, steps=np.array([1]),
                 arrays={"wins": np.zeros((1, 10))}),
          st.Run(name="b", method="b", seed=0, steps=np.array([1]),
                 arrays={"wins": np.zeros((1, 12))})]
  with pytest.raises(ValueError, match="same prompts"):
    st.bootstrap(lambda g: 0.0, runs, num_resamples=2)
