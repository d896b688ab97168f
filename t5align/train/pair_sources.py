"""Pair sources: where the alignment step's pairs come from.

Online and offline alignment differ only here. Every source yields the same
batch for ``steps.make_align_step``: ``prompt [B, P]``, ``chosen [B, T]``,
``rejected [B, T]``, ``label [B]`` (P(chosen preferred): 1.0, or 0.5 for an
exact preference-model tie), ``ref_chosen [B]``, ``ref_rejected [B]``.

* ``OfflinePairs``: a fixed tokenised dataset (D_golden, or any relabelled or
  fixed-policy set); reference log-probs computed once and cached on disk.
* ``OnlinePairs``: two samples per prompt from the *current* policy, ordered by
  a preference model with the decision rule, reference log-probs computed in
  the same jitted function; every batch is recorded, token-exact, in order.
* ``ReplayPairs``: a recorded online stream, in order, shuffled, or shuffled
  within windows of k batches (the paper's tandem and sanity runs).

A source's position (``get_state``/``set_state``) is saved with each checkpoint,
and every random choice is a function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

import contextlib
import dataclasses
import functools
import hashlib
import os
from typing import Callable, ContextManager, Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5align import sampling
from t5align.models import preference
from t5align.models import t5
from t5align.train import steps

Array = jax.Array
PairArrays = dict[str, np.ndarray]
PAIR_KEYS = ("prompt", "chosen", "rejected", "label", "ref_chosen", "ref_rejected")


def order_pairs(prompt: np.ndarray, response_a: np.ndarray, response_b: np.ndarray,
                label: np.ndarray) -> PairArrays:
  """Dataset rows (a, b, P(a preferred)) -> (chosen, rejected, P(chosen preferred)).

  The response with label >= 1/2 becomes ``chosen``; its label becomes
  ``max(p, 1 - p)`` (1.0 for hard labels, 0.5 for a tie).
  """
  label = np.asarray(label, np.float32)
  a_wins = (label >= 0.5)[:, None]
  return {"prompt": np.asarray(prompt, np.int32),
          "chosen": np.where(a_wins, response_a, response_b).astype(np.int32),
          "rejected": np.where(a_wins, response_b, response_a).astype(np.int32),
          "label": np.maximum(label, 1.0 - label)}


def _fingerprint(*arrays_or_trees) -> str:
  digest = hashlib.sha256()
  for tree in arrays_or_trees:
    for leaf in jax.tree.leaves(tree):
      leaf = np.asarray(leaf)
      digest.update(str((leaf.shape, leaf.dtype.str)).encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


@functools.partial(jax.jit, static_argnames=("config", "reduction"))
def _reference_logprobs(params, prompt, chosen, rejected, *, config, reduction):
  both = steps.response_logprobs(params, config, jnp.concatenate([prompt, prompt]),
                                 jnp.concatenate([chosen, rejected]), reduction=reduction)
  return jnp.split(both, 2)


def reference_logprobs(params, config: t5.T5Config, pairs: PairArrays, *, reduction: str,
                       batch_size: int = 32, cache_dir: Optional[str] = None,
                       progress: Callable[[str], None] = print) -> PairArrays:
  """Adds ``ref_chosen``/``ref_rejected`` to ``pairs``, computed once per dataset.

  With ``cache_dir``, the result is stored as ``ref_logprobs-<key>.npz`` where
  the key hashes the token arrays, the reference parameters and the
  reduction, so a changed dataset or checkpoint never reuses stale values and
  offline runs never keep a reference model resident.
  """
  key = _fingerprint(pairs["prompt"], pairs["chosen"], pairs["rejected"], params) + "-" + reduction
  path = os.path.join(cache_dir, f"ref_logprobs-{key}.npz") if cache_dir else None
  if path and os.path.exists(path):
    with np.load(path) as cached:
      return dict(pairs, ref_chosen=cached["ref_chosen"], ref_rejected=cached["ref_rejected"])
  n = len(pairs["prompt"])
  chosen_out, rejected_out = [], []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    idx = np.arange(start, start + batch_size) % n  # fixed shapes: one compilation
    c, r = _reference_logprobs(params, pairs["prompt"][idx], pairs["chosen"][idx],
                               pairs["rejected"][idx], config=config, reduction=reduction)
    chosen_out.append(np.asarray(c)[: stop - start])
    rejected_out.append(np.asarray(r)[: stop - start])
  progress(f"reference log-probs: {n} pairs scored")
  result = dict(pairs, ref_chosen=np.concatenate(chosen_out).astype(np.float32),
                ref_rejected=np.concatenate(rejected_out).astype(np.float32))
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, ref_chosen=result["ref_chosen"], ref_rejected=result["ref_rejected"])
    os.replace(tmp, path)
  return result


class EpochBatches:
  """Epochs over fixed arrays (equal leading dimension), reshuffled per epoch.

  The order of epoch ``e`` is a permutation seeded with ``(seed, e)``; a ragged
  tail shorter than a batch is dropped. The position is ``(epoch, index)``.
  """

  def __init__(self, arrays: dict, *, batch_size: int, seed: int):
    self._n = len(next(iter(arrays.values())))
    if self._n < batch_size:
      raise ValueError(f"dataset has {self._n} rows, fewer than one batch of {batch_size}")
    self._arrays, self._batch_size, self._seed = arrays, batch_size, seed
    self._epoch, self._index = 0, 0

  def next_batch(self, state) -> dict:
    del state  # fixed data does not depend on the policy
    if self._index + self._batch_size > self._n:
      self._epoch, self._index = self._epoch + 1, 0
    order = np.random.default_rng([self._seed, self._epoch]).permutation(self._n)
    rows = order[self._index:self._index + self._batch_size]
    self._index += self._batch_size
    return {k: v[rows] for k, v in self._arrays.items()}

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, data_state: dict) -> None:
    self._epoch, self._index = int(data_state["epoch"]), int(data_state["index"])

  def on_restore(self, step: int) -> None:
    del step


class OfflinePairs(EpochBatches):
  """Epochs over a fixed pair dataset with cached reference log-probs."""

  def __init__(self, pairs: PairArrays, *, batch_size: int, seed: int):
    missing = [k for k in PAIR_KEYS if k not in pairs]
    if missing:
      raise ValueError(f"offline pairs lack {missing}; call reference_logprobs() first")
    super().__init__({k: pairs[k] for k in PAIR_KEYS}, batch_size=batch_size, seed=seed)


@dataclasses.dataclass(frozen=True)
class OnlineSettings:
  """Static settings of the online sample -> label -> score function."""
  policy_config: t5.T5Config
  pm_config: t5.T5Config
  pair_format: preference.PairFormat
  pm_input_length: int
  max_decode_length: int
  temperature: float = 1.0
  reduction: str = "sum"


@functools.partial(jax.jit, static_argnames=("settings",))
def online_pairs(policy_params, ref_params, pm_params, prompt: Array, rng: Array, *,
                 settings: OnlineSettings) -> dict:
  """Two samples per prompt from the policy, ordered by the PM, scored by the reference.

  All on device in one jitted function (no weight copies between engines).
  Samples are constants for the update (no gradient through sampling).
  """
  s = settings
  out = sampling.sample(policy_params, prompt, config=s.policy_config, rng=rng, num_samples=2,
                        max_decode_length=s.max_decode_length, temperature=s.temperature)
  y1, y2 = out.tokens[0::2], out.tokens[1::2]  # rows are grouped per prompt
  judged = preference.symmetric_preference(pm_params, s.pm_config, s.pair_format, prompt, y1, y2,
                                           s.pm_input_length)
  label_1 = preference.decide(judged["margin"])  # P(y1 preferred): 1, 0 or 1/2
  first_wins = (label_1 >= 0.5)[:, None]
  chosen = jnp.where(first_wins, y1, y2)
  rejected = jnp.where(first_wins, y2, y1)
  ref_chosen, ref_rejected = _reference_logprobs(ref_params, prompt, chosen, rejected,
                                                 config=s.policy_config, reduction=s.reduction)
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
          "label": jnp.maximum(label_1, 1.0 - label_1),
          "ref_chosen": ref_chosen, "ref_rejected": ref_rejected,
          "pm_margin": jnp.abs(judged["margin"])}


class OnlinePairs:
  """Samples pairs from the current policy; the paper's online IPO data.

  Prompts of step ``t`` are drawn uniformly (with replacement) by a generator
  seeded with ``(seed, t)``; the sampling key is ``fold_in(key(seed), t)``.
  ``recorder`` (e.g. a ``writers.StreamWriter``) receives every labelled batch
  in order with its step; on restore (and when a fresh run finds batches of a
  killed predecessor) the stream is rolled back to the current step, so the
  recording has no missing or duplicated batch.
  """

  def __init__(self, prompts: np.ndarray, *, settings: OnlineSettings, ref_params, pm_params,
               batch_size: int, seed: int, recorder=None,
               context: Callable[[], ContextManager] = contextlib.nullcontext):
    if len(prompts) == 0:
      raise ValueError("online pairs need at least one prompt")
    self._prompts = np.asarray(prompts, np.int32)
    self._settings, self._ref, self._pm = settings, ref_params, pm_params
    self._batch_size, self._seed, self._recorder = batch_size, seed, recorder
    self._context = context  # the training mesh and rules, so sampling runs sharded
    self._step = 0

  def next_batch(self, state) -> dict:
    step = self._step
    rows = np.random.default_rng([self._seed, step]).integers(0, len(self._prompts),
                                                               self._batch_size)
    rng = jax.random.fold_in(jax.random.key(self._seed), step)
    with self._context():
      batch = online_pairs(state.params, self._ref, self._pm, self._prompts[rows], rng,
                           settings=self._settings)
    batch = jax.tree.map(np.asarray, batch)
    if self._recorder is not None:
      if self._recorder.committed_steps()[-1:] >= [step]:
        # Batches a killed run recorded after its last checkpoint are redone.
        self._recorder.rollback(step)
      self._recorder.append(step, {k: batch[k] for k in PAIR_KEYS})
    self._step += 1
    return {k: batch[k] for k in PAIR_KEYS}

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, data_state: dict) -> None:
    self._step = int(data_state["step"])

  def on_restore(self, step: int) -> None:
    if self._recorder is not None:
      self._recorder.rollback(step)


REPLAY_ORDERS = ("ordered", "shuffled", "windowed")


def replay_order(num_batches: int, *, order: str, seed: int, window: int = 1) -> np.ndarray:
  """Batch order of a replay: identity, a uniform permutation, or permutations within windows.

  ``windowed`` with window k permutes each run of k consecutive batches
  (our reading of the paper's "shuffle every k batches"); window 1 is the
  identity and window >= num_batches a uniform shuffle.
  """
  if order not in REPLAY_ORDERS:
    raise ValueError(f"unknown replay order {order!r}; allowed: {REPLAY_ORDERS}")
  if order == "ordered":
    return np.arange(num_batches)
  rng = np.random.default_rng(seed)
  if order == "shuffled":
    return rng.permutation(num_batches)
  if window < 1:
    raise ValueError(f"replay window must be >= 1, got {window}")
  return np.concatenate([start + rng.permutation(min(window, num_batches - start))
                         for start in range(0, num_batches, window)])


class ReplayPairs:
  """Replays recorded online batches (token-exact), possibly reordered."""

  def __init__(self, batches: list[dict], *, order: str, seed: int, window: int = 1):
    if not batches:
      raise ValueError("the recorded stream is empty")
    self._batches = batches
    self._order = replay_order(len(batches), order=order, seed=seed, window=window)
    self._position = 0

  def __len__(self) -> int:
    return len(self._batches)

  def next_batch(self, state) -> dict:
    del state
    if self._position >= len(self._order):
      raise StopIteration(f"replay exhausted after {len(self._order)} batches")
    batch = self._batches[self._order[self._position]]
    self._position += 1
    return {k: np.asarray(batch[k]) for k in PAIR_KEYS}

  def get_state(self) -> dict:
    return {"position": self._position}

  def set_state(self, data_state: dict) -> None:
    self._position = int(data_state["position"])

  def on_restore(self, step: int) -> None:
    del step
