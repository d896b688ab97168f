"""Statistics of the study's report: matched-KL envelopes, bootstrap intervals, verdicts.

**Envelope.** A run's checkpoints are points (log KL, win rate). Sorted by
log KL they give the run's curve, linear between points and undefined
outside the run's KL range. A method's upper envelope is, at each log KL,
the best of its runs' curves that reach it (paper Fig. 1 pools a method's
runs the same way). Two methods are compared on the log-KL range both
envelopes cover: ``matched_difference`` is the mean of ``E_a - E_b`` over
``GRID_POINTS`` evenly spaced log-KL values of that range. Example: run a
(log KL 0, 0.3), (1, 0.5) and run b (0.5, 0.2), (2, 0.4): the shared range is
[0.5, 1]; there E_a(x) = 0.3 + 0.2x and E_b(x) = 0.2 + 0.2(x - 0.5)/1.5, so
the difference rises linearly from 0.2 to 0.2333 and its mean is 0.2167.

**Bootstrap.** Every checkpoint is evaluated on the same prompts and pairs,
so one resample of prompt indices applies to all checkpoints of all runs
(a paired bootstrap), drawn separately for each axis of items: the win-rate
prompts, the KL prompts, the D_golden pairs and the online-stream pairs.
Training seeds are resampled with replacement, per method. A replicate
recomputes every checkpoint's means with the resampled items and runs the
statistic on the resampled set of runs; the interval is the 2.5% and 97.5%
percentiles of the replicates (``percentile_interval``).

**Verdicts** (``verdict``) follow rules stated before the numbers exist:
a claim that A exceeds B is *reproduced* when the whole 95% interval of
A - B is above 0, *not reproduced* when it is below 0, and *inconclusive*
otherwise; a claim that A matches B is reproduced when the interval lies
within +-``SIMILARITY_MARGIN``, not reproduced when it lies outside it, and
inconclusive otherwise.
"""

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

GRID_POINTS = 64
SIMILARITY_MARGIN = 0.05  # win-rate units
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

# Which item axis each per-checkpoint array is a mean over.
AXES = {"wins": "winrate", "oracle_wins": "winrate", "kl_values": "kl",
        "d_golden_correct": "d_golden", "d_golden_drift_winner": "d_golden",
        "d_golden_drift_loser": "d_golden", "online_correct": "online",
        "stream_agreement": "stream"}


def curve(log_kl: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """One run's points sorted by log KL (points at one log KL averaged)."""
  x = np.asarray(log_kl, np.float64)
  y = np.asarray(values, np.float64)
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  unique, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=y, minlength=len(unique))
  return unique, sums / np.bincount(inverse, minlength=len(unique))


def interpolate(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """The curve (x, y) at ``grid``: linear inside [x[0], x[-1]], NaN outside."""
  if not len(x):
    return np.full(len(grid), np.nan)
  out = np.interp(grid, x, y)
  out[(grid < x[0]) | (grid > x[-1])] = np.nan
  return out


def envelope(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray) -> np.ndarray:
  """The best curve at each grid point among those defined there; NaN where none is."""
  if not curves:
    return np.full(len(grid), np.nan)
  stacked = np.stack([interpolate(x, y, grid) for x, y in curves])
  defined = np.isfinite(stacked).any(axis=0)
  out = np.full(len(grid), np.nan)
  out[defined] = np.nanmax(stacked[:, defined], axis=0)
  return out


def kl_range(curves) -> Optional[tuple[float, float]]:
  points = [x for x, _ in curves if len(x)]
  if not points:
    return None
  return float(min(x[0] for x in points)), float(max(x[-1] for x in points))


def matched_difference(curves_a, curves_b, *, num_points: int = GRID_POINTS) -> Optional[float]:
  """Mean of envelope_a - envelope_b over the log-KL range both cover (None if none)."""
  range_a, range_b = kl_range(curves_a), kl_range(curves_b)
  if range_a is None or range_b is None:
    return None
  lo, hi = max(range_a[0], range_b[0]), min(range_a[1], range_b[1])
  if not lo < hi:
    return None
  grid = np.linspace(lo, hi, num_points)
  diff = envelope(curves_a, grid) - envelope(curves_b, grid)
  diff = diff[np.isfinite(diff)]
  return float(np.mean(diff)) if len(diff) else None


def shared_range(curves_a, curves_b) -> Optional[tuple[float, float]]:
  range_a, range_b = kl_range(curves_a), kl_range(curves_b)
  if range_a is None or range_b is None:
    return None
  lo, hi = max(range_a[0], range_b[0]), min(range_a[1], range_b[1])
  return (lo, hi) if lo < hi else None


@dataclasses.dataclass
class Run:
  """One evaluated run: its method, training seed and per-checkpoint item arrays.

  ``arrays[name]`` is ``[checkpoints, items]`` (rows in step order, the SFT row
  excluded), one column per prompt or pair of that array's axis (``AXES``).
  """
  name: str
  method: str
  seed: int
  steps: np.ndarray
  arrays: dict


@dataclasses.dataclass
class Means:
  """A run as a statistic sees it: per-checkpoint means of each array."""
  name: str
  method: str
  seed: int
  steps: np.ndarray
  means: dict

  def curve(self, field: str = "wins") -> tuple[np.ndarray, np.ndarray]:
    kl = self.means["kl_values"]
    with np.errstate(divide="ignore"):
      log_kl = np.where(kl > 0, np.log(np.maximum(kl, 1e-300)), np.nan)
    return curve(log_kl, self.means[field])


Statistic = Callable[[dict[str, list[Means]]], Optional[float]]


def _means(run: Run, weights: Mapping[str, np.ndarray]) -> Means:
  means = {}
  for name, values in run.arrays.items():
    w = weights.get(AXES.get(name))
    means[name] = values.mean(axis=1) if w is None else values @ w / w.sum()
  return Means(run.name, run.method, run.seed, run.steps, means)


def group(runs: Sequence[Means]) -> dict[str, list[Means]]:
  out: dict[str, list[Means]] = {}
  for run in runs:
    out.setdefault(run.method, []).append(run)
  return out


def bootstrap(statistic: Statistic, runs: Sequence[Run], *, num_resamples: int = 1000,
              seed: int = 0, resample_seeds: bool = True) -> dict:
  """The statistic on ``runs`` and its bootstrap replicates (module docstring).

  Returns ``{'value', 'interval': (lo, hi) or None, 'replicates': finite count,
  'resamples'}``; the interval is None when fewer than 90% of the replicates
  are defined (e.g. methods whose KL ranges rarely overlap).
  """
  value = statistic(group([_means(r, {}) for r in runs]))
  sizes = {}
  for run in runs:
    for name, values in run.arrays.items():
      axis = AXES.get(name)
      if axis is not None:
        if sizes.setdefault(axis, values.shape[1]) != values.shape[1]:
          raise ValueError(f"run {run.name}: array {name} has {values.shape[1]} items, other "
                           f"runs have {sizes[axis]} on axis {axis!r}: the runs were not "
                           "evaluated on the same prompts and pairs")
  rng = np.random.default_rng(seed)
  seeds_of = {}
  for run in runs:
    seeds_of.setdefault(run.method, [])
    if run.seed not in seeds_of[run.method]:
      seeds_of[run.method].append(run.seed)
  replicates = []
  for _ in range(num_resamples):
    weights = {axis: np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
               for axis, n in sorted(sizes.items())}
    chosen = []
    for method, seeds in sorted(seeds_of.items()):
      drawn = rng.choice(seeds, size=len(seeds)) if resample_seeds else seeds
      for s in drawn:
        chosen += [r for r in runs if r.method == method and r.seed == s]
    result = statistic(group([_means(r, weights) for r in chosen]))
    if result is not None and math.isfinite(result):
      replicates.append(result)
  interval = None
  if len(replicates) >= 0.9 * num_resamples:
    interval = percentile_interval(np.asarray(replicates))
  return {"value": value, "interval": interval, "replicates": len(replicates),
          "resamples": num_resamples}


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(replicates, [tail, 100 - tail])
  return float(lo), float(hi)


def verdict(kind: str, value: Optional[float], interval: Optional[tuple[float, float]]) -> str:
  """The verdict of a claim of ``kind`` 'greater', 'less' or 'similar' (module docstring)."""
  if value is None or interval is None:
    return INCONCLUSIVE
  lo, hi = interval
  if kind == "greater":
    return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else INCONCLUSIVE
  if kind == "less":
    return REPRODUCED if hi < 0 else NOT_REPRODUCED if lo > 0 else INCONCLUSIVE
  if kind == "similar":
    m = SIMILARITY_MARGIN
    if -m <= lo and hi <= m:
      return REPRODUCED
    return NOT_REPRODUCED if lo > m or hi < -m else INCONCLUSIVE
  raise ValueError(f"unknown claim kind {kind!r}; expected 'greater', 'less' or 'similar'")
