"""Evaluation of a run's checkpoints: KL to SFT, win rate, classification, drift.

``evaluate_run`` reads the finalized checkpoints of one run (never training
internals) and writes one row per checkpoint, following the paper's
definitions (Tang et al. 2024, §4.1, §5.3, App. D, App. E, Fig. 8; see
``docs/evaluation.md``):

* ``kl``: KL(pi || pi_sft) by the App. D estimator: one sample per prompt for
  the KL prompt subset, the exact per-token KL of the two full next-token
  distributions summed over the sample's tokens (EOS included, padding
  excluded), averaged over prompts. ``log_kl`` is its natural log (what the
  paper plots; null when the KL is 0).
* ``win_rate``: one sample from the policy and one from the golden policy per
  prompt of the win-rate subset, judged by the golden preference model with
  the decision rule (win 1 if r(x,y,y_g) - r(x,y_g,y) > 0, 0 if < 0, 1/2 on an
  exact tie); the mean, with its standard error.
* ``accuracy_d_golden`` / ``accuracy_online``: the policy as a classifier,
  f = Delta with response 1 (``chosen``) as the putative winner; predicted
  label 1 if f > 0, 0 if f < 0, 1/2 if f == 0 (the SFT policy itself scores
  exactly 1/2); agreement with the pair's label, averaged.
* ``drift_winner`` / ``drift_loser``: mean over the D_golden classification
  pairs of log pi(y_w|x) - log pi_sft(y_w|x) (sequence log-probs, summed over
  tokens), and the same for y_l.

Reproducibility. Every checkpoint is evaluated on the same prompts and pairs,
with the same random draws: prompt and pair subsets are the first ``k``
entries of ``numpy.random.default_rng([seed, purpose_id]).permutation(n)``,
and the samples of batch ``b`` of a purpose are drawn with
``fold_in(fold_in(key(seed), purpose_id), b)`` (see ``PURPOSES``; draws
therefore depend on ``batch_size`` as well, which is recorded in each row).
Golden-policy samples and SFT log-probs are computed once per call and reused
for every checkpoint.

Batches have one fixed shape: the last batch is filled up by repeating its
final row and the filler outputs are dropped, so each function compiles once.

Placement. The policies and the golden PM are placed on the mesh of a
``partitioning.Placement`` (default: one device) with its rule set, so a judge
or policy larger than one device is evaluated sharded (e.g. fsdp); every batch
of ``batch_size`` rows is split over the mesh's 'data' axis. Results do not
depend on the placement: samples are drawn per row (``t5align.sampling``).

Files. Rows go to ``output_path`` (JSONL, rewritten atomically after every
row) and to a CSV with the same stem. A checkpoint that cannot be loaded, or
whose parameters do not match ``policy_config``, is reported on the progress
stream and recorded in ``<stem>.errors.jsonl``; the other checkpoints are
still evaluated. Steps already in the output file are skipped on a rerun, so
an interrupted evaluation, or one of a run that is still training, continues
where it stopped.
"""

import csv
import functools
import io
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from t5align import partitioning
from t5align import sampling
from t5align.models import preference
from t5align.models import t5
from t5align.train import checkpoints as checkpoints_lib

Params = Any

# A run directory keeps its checkpoints here (a directory holding step
# directories directly is accepted as well).
CHECKPOINT_SUBDIR = "checkpoints"
# The `checkpoint` field of the step-0 row made from `sft_params`.
SFT_CHECKPOINT = "sft"

# Independent streams of randomness, by purpose; the ids are part of the
# reproducibility contract (module docstring), so never renumber them.
PURPOSES = {
    "kl_prompts": 0,
    "winrate_prompts": 1,
    "classification_pairs": 2,
    "online_pairs": 3,
    "kl_samples": 4,
    "policy_samples": 5,
    "golden_samples": 6,
}

# Row fields that fix what a row measures; rows of one output file must agree
# on all of them (a rerun with other settings needs another output file).
SETTINGS_FIELDS = ("seed", "batch_size", "max_decode_length", "pm_input_length",
                   "num_kl_prompts", "num_winrate_prompts", "num_classification_pairs",
                   "num_online_pairs")

# CSV column order; fields not listed here follow in sorted order.
COLUMNS = ("step", "checkpoint", "kl", "log_kl", "kl_stderr", "win_rate", "win_rate_stderr",
           "win_rate_ties", "response_length", "accuracy_d_golden", "accuracy_online",
           "drift_winner", "drift_loser") + SETTINGS_FIELDS + ("eval_seconds",)

PAIR_FIELDS = ("prompt", "chosen", "rejected", "label")
# evaluate_stage keeps its sample of online-stream pairs here, in the output directory.
ONLINE_PAIRS_FILE = "online_pairs.npz"
# An online run's proxy-vs-golden agreement along its own stream (Fig. 6).
STREAM_AGREEMENT_FILE = "stream_agreement.json"
STREAM_BINS = 10


def subset_indices(n: int, k: int, *, seed: int, purpose: str) -> np.ndarray:
  """The first ``min(k, n)`` entries of the seeded permutation of ``range(n)``."""
  rng = np.random.default_rng([seed, PURPOSES[purpose]])
  return rng.permutation(n)[:min(k, n)]


def purpose_key(seed: int, purpose: str) -> jax.Array:
  """The PRNG key of one purpose; batch ``b`` samples with ``fold_in(key, b)``."""
  return jax.random.fold_in(jax.random.key(seed), PURPOSES[purpose])


def output_paths(output_path: str) -> dict[str, str]:
  """Where ``evaluate_run`` writes, given its JSONL ``output_path``."""
  stem = output_path[:-len(".jsonl")] if output_path.endswith(".jsonl") else output_path
  return {"jsonl": output_path, "csv": stem + ".csv", "errors": stem + ".errors.jsonl",
          "samples": stem + ".samples"}


def read_rows(path: str) -> list[dict]:
  """The rows of an ``evaluate_run`` JSONL file (empty when the file does not exist)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line_number} is not valid JSON ({e}); delete the line "
                         "(its step is then evaluated again) or the file") from e
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError(f"{path}: line {line_number} has no integer field 'step'")
      rows.append(row)
  return rows


def evaluate_run(*, run_dir: Optional[str] = None, checkpoint_dir: Optional[str] = None,
                 policy_config: t5.T5Config, sft_params: Params, golden_policy_params: Params,
                 golden_pm_params: Params, golden_pm_config: t5.T5Config,
                 pair_format: preference.PairFormat, prompts: np.ndarray,
                 d_golden_pairs: Mapping[str, np.ndarray],
                 online_stream_pairs: Optional[Mapping[str, np.ndarray]] = None,
                 golden_policy_config: Optional[t5.T5Config] = None,
                 steps: Optional[Sequence[int]] = None, include_sft: bool = False,
                 num_kl_prompts: int = 256, num_winrate_prompts: int = 2048,
                 num_classification_pairs: int = 256, max_decode_length: int = 128,
                 pm_input_length: int = 1024, batch_size: int = 32, seed: int = 0,
                 output_path: Optional[str] = None, save_samples: bool = False,
                 placement: Optional[partitioning.Placement] = None,
                 extra_metrics: Optional[Callable[..., tuple[dict, dict]]] = None,
                 extra_columns: Optional[Mapping[str, Any]] = None,
                 progress: Callable[[str], None] = print) -> list[dict]:
  """Evaluates every (or the chosen) checkpoint of a run; see the module docstring.

  Args:
    run_dir: a run directory; its checkpoints are read from
      ``<run_dir>/checkpoints`` (or from ``run_dir`` itself if it holds the
      step directories). Give this or ``checkpoint_dir``.
    checkpoint_dir: a directory of step directories (``checkpoints.list_steps``).
    policy_config: the network of the run's policy and of the SFT policy.
    sft_params: the SFT policy, pi_sft (start point and reference).
    golden_policy_params: the fixed opponent of the win rate.
    golden_pm_params: the golden preference model (the judge).
    golden_pm_config: its network.
    pair_format: how the judge's inputs are framed.
    prompts: int ``[N, P]`` tokenised train prompts (left-aligned, pad 0).
    d_golden_pairs: D_golden pairs: int ``prompt [M, P]``, ``chosen [M, T]``,
      ``rejected [M, T]`` and float ``label [M]`` = P(chosen is better).
    online_stream_pairs: optional pairs of the same shape from the run's
      recorded online stream (out-of-distribution classification).
    golden_policy_config: the golden policy's network; None = ``policy_config``
      (a different one is allowed: the paper's XL runs play the Large golden policy).
    steps: checkpoint steps to evaluate; None = all finalized steps.
    include_sft: also evaluate ``sft_params`` as step 0 (unless the run has a
      step-0 checkpoint, which is then evaluated as any other).
    num_kl_prompts: prompts in the KL estimate (paper: 256; 32 for XL).
    num_winrate_prompts: prompts in the win rate (paper: 2048).
    num_classification_pairs: pairs for accuracy and drift (paper: 256), from
      D_golden and, separately, from the online stream.
    max_decode_length: sample length cap (paper: 128, the target length).
    pm_input_length: the judge's input length (paper: 1024).
    batch_size: rows per compiled call.
    seed: the seed of every subset and draw.
    output_path: the JSONL file of rows; None = ``<run_dir>/eval/eval.jsonl``.
    save_samples: also write each step's prompt indices, samples and
      per-example values to ``<stem>.samples/step_<step>.npz``.
    placement: the mesh and rule set every model is placed on; None = one
      device. ``batch_size`` must divide over its 'data' axis.
    extra_metrics: optional report columns computed from each checkpoint's
      win-rate samples: called with ``prompts [N, P]``, ``policy_samples [N, T]``,
      ``golden_samples [N, T]`` and ``margins [N]`` (numpy), it returns
      ``(columns, per-example arrays)``; the arrays go to the saved samples.
      The miniature world's oracle columns (``t5align.eval.oracle``) use it.
    extra_columns: fixed values added to every row (e.g. the online pairs'
      proxy-vs-golden agreement).
    progress: receives one line per event.

  Returns:
    All rows of the output file (earlier ones included), sorted by step.

  Raises:
    ValueError: bad inputs, SFT/golden parameters that do not match their
      configs, or an output file written with other settings.
    FileNotFoundError: no checkpoint directory, or a requested step is missing.
  """
  checkpoint_dir = _resolve_checkpoint_dir(run_dir, checkpoint_dir)
  if output_path is None:
    if run_dir is None:
      raise ValueError("output_path is required when evaluating a checkpoint_dir")
    output_path = os.path.join(run_dir, "eval", "eval.jsonl")
  golden_policy_config = golden_policy_config or policy_config
  prompts = _check_tokens(prompts, "prompts")
  d_golden_pairs = _check_pairs(d_golden_pairs, "d_golden_pairs")
  if online_stream_pairs is not None:
    online_stream_pairs = _check_pairs(online_stream_pairs, "online_stream_pairs")
  _check_params(sft_params, policy_config, "sft_params")
  _check_params(golden_policy_params, golden_policy_config, "golden_policy_params")
  _check_params(golden_pm_params, golden_pm_config, "golden_pm_params")
  _check_vocabularies(policy_config, golden_policy_config, golden_pm_config, pair_format)
  for name, value in (("num_kl_prompts", num_kl_prompts), ("batch_size", batch_size),
                      ("num_winrate_prompts", num_winrate_prompts),
                      ("num_classification_pairs", num_classification_pairs)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  placement = placement or partitioning.Placement.single_device()
  placement.check_batch_size(batch_size)
  # The judge's serialisation raises now, not after the first checkpoint, if two
  # samples and the markers cannot fit in its input.
  jax.eval_shape(functools.partial(preference.serialize_pair, fmt=pair_format,
                                   max_length=pm_input_length),
                 *(jax.ShapeDtypeStruct((1, width), np.int32)
                   for width in (prompts.shape[1], max_decode_length, max_decode_length)))

  num_prompts = prompts.shape[0]
  num_pairs = d_golden_pairs["prompt"].shape[0]
  counts = {"num_kl_prompts": min(num_kl_prompts, num_prompts),
            "num_winrate_prompts": min(num_winrate_prompts, num_prompts),
            "num_classification_pairs": min(num_classification_pairs, num_pairs),
            "num_online_pairs": (0 if online_stream_pairs is None else
                                 min(num_classification_pairs,
                                     online_stream_pairs["prompt"].shape[0]))}
  for name, requested in (("num_kl_prompts", num_kl_prompts),
                          ("num_winrate_prompts", num_winrate_prompts),
                          ("num_classification_pairs", num_classification_pairs)):
    if counts[name] < requested:
      progress(f"eval: note: {name}={requested} asked, only {counts[name]} available; using all")
  settings = {"seed": int(seed), "batch_size": int(batch_size),
              "max_decode_length": int(max_decode_length),
              "pm_input_length": int(pm_input_length), **counts}

  paths = output_paths(output_path)
  rows = read_rows(paths["jsonl"])
  _check_settings(rows, settings, paths["jsonl"])
  errors = {e["step"]: e for e in read_rows(paths["errors"])}
  done = {row["step"] for row in rows}

  available = checkpoints_lib.list_steps(checkpoint_dir)
  if steps is None:
    wanted = list(available)
  else:
    wanted = sorted({int(s) for s in steps})
    missing = [s for s in wanted if s not in available]
    if missing:
      raise FileNotFoundError(f"no finalized checkpoint for steps {missing} in {checkpoint_dir}; "
                              f"have {available}")
  if include_sft and 0 not in available:
    wanted = [0] + wanted
  todo = [s for s in wanted if s not in done]
  progress(f"eval: {len(wanted)} step(s) wanted from {checkpoint_dir}, {len(wanted) - len(todo)} "
           f"already in {paths['jsonl']}; evaluating {len(todo)}")
  if not todo:
    return sorted(rows, key=lambda r: r["step"])

  context = None
  for position, step in enumerate(todo, start=1):
    tag = f"eval step {step} [{position}/{len(todo)}]"
    started = time.time()
    if step == 0 and 0 not in available:
      where, params = SFT_CHECKPOINT, sft_params
    else:
      where = os.path.join(checkpoint_dir, str(step))
      try:
        params = checkpoints_lib.load_params(checkpoint_dir, step)
        _check_params(params, policy_config, f"checkpoint {where}")
      except Exception as e:  # pylint: disable=broad-except
        # Reported and recorded, never swallowed: a corrupt step must not stop
        # the evaluation of the others.
        message = f"{type(e).__name__}: {e}"
        progress(f"{tag}: ERROR: cannot use checkpoint {where}: {message} "
                 f"(skipped; recorded in {paths['errors']})")
        errors[step] = {"step": step, "checkpoint": where, "error": message}
        _write_jsonl(paths["errors"], [errors[s] for s in sorted(errors)])
        continue
    if context is None:
      context = _Context(
          policy_config=policy_config, golden_policy_config=golden_policy_config,
          golden_pm_config=golden_pm_config, pair_format=pair_format, prompts=prompts,
          sft_params=sft_params, golden_policy_params=golden_policy_params,
          golden_pm_params=golden_pm_params, d_golden_pairs=d_golden_pairs,
          online_stream_pairs=online_stream_pairs, settings=settings, placement=placement,
          extra_metrics=extra_metrics, progress=progress)
    progress(f"{tag}: {where}: KL on {counts['num_kl_prompts']} prompts, win rate on "
             f"{counts['num_winrate_prompts']} prompts, accuracy on "
             f"{counts['num_classification_pairs']} D_golden pairs"
             + (f" and {counts['num_online_pairs']} online pairs" if counts["num_online_pairs"]
                else ""))
    metrics, arrays = context.evaluate(placement.params(params, policy_config))
    row = {"step": int(step), "checkpoint": where, **metrics, **(extra_columns or {}), **settings,
           "eval_seconds": round(time.time() - started, 3)}
    rows = [r for r in rows if r["step"] != step] + [row]
    rows.sort(key=lambda r: r["step"])
    if save_samples:
      _write_npz(os.path.join(paths["samples"], f"step_{step}.npz"), arrays)
    _write_jsonl(paths["jsonl"], rows)
    _write_csv(paths["csv"], rows)
    if step in errors:
      del errors[step]
      _write_jsonl(paths["errors"], [errors[s] for s in sorted(errors)])
    progress(f"{tag}: kl={row['kl']:.4g} win_rate={row['win_rate']:.4f}"
             f"±{row['win_rate_stderr']:.4f} accuracy_d_golden={row['accuracy_d_golden']:.4f} "
             f"drift_winner={row['drift_winner']:.3f} ({row['eval_seconds']:.1f}s)")
  failed = [s for s in todo if s in errors]
  if failed:
    progress(f"eval: {len(failed)} checkpoint(s) could not be evaluated: steps {failed}; "
             f"see {paths['errors']}")
  return rows


def evaluate_stage(*, run_dir: str, output_dir: str, policy_config: t5.T5Config,
                   sft_checkpoint: str, golden_policy_checkpoint: str, golden_pm_run: str,
                   golden_pm_config: t5.T5Config, d_golden: str,
                   golden_policy_config: Optional[t5.T5Config] = None,
                   online_stream: Optional[str] = None, vocabulary_path: Optional[str] = None,
                   feature_lengths=None, steps: Optional[Sequence[int]] = None,
                   include_sft: bool = True, num_kl_prompts: int = 256,
                   num_winrate_prompts: int = 2048, num_classification_pairs: int = 256,
                   batch_size: int = 32, seed: int = 0, save_samples: bool = False,
                   partitioning_config=None, oracle: bool = False) -> list[dict]:
  """``t5align eval``: ``evaluate_run`` on the files the training stages write.

  Reads the SFT and golden-policy parameters from their run (or imported
  checkpoint) directories (the latest step), the golden PM's best-validation
  checkpoint, D_golden from the preference-example file ``d_golden`` (its
  pairs are the classification pairs, its distinct prompts the train prompts),
  and the online-stream pairs from ``online_stream`` (default: the run's own
  ``<run_dir>/stream`` when it exists; a seeded uniform sample of
  ``num_classification_pairs`` pairs, kept in ``<output_dir>/online_pairs.npz``
  for later reruns). Writes ``<output_dir>/eval.jsonl`` and its companions.
  ``feature_lengths`` (``stages.FeatureLengths``) gives the judge's input
  length and the sample length; ``partitioning_config``
  (``stages.Partitioning``, default all devices data parallel) the mesh and
  rule set the models are placed on.

  Online-stream pairs are classified against the golden PM's labels (the
  paper's Fig. 6), not the stream's own (proxy) labels: the stream's labels
  are kept as ``proxy_label`` and each row records
  ``online_proxy_golden_agreement``. A run with its own stream also gets
  ``stream_agreement.json``: the proxy-vs-golden agreement on
  ``num_classification_pairs`` pairs near each of ``STREAM_BINS`` evenly
  spaced steps of the stream. ``oracle``: add the miniature world's validity
  columns (``t5align.eval.oracle``).
  """
  # The data pipeline (TensorFlow, SentencePiece) is only needed here.
  from t5align.data import tasks  # pylint: disable=g-import-not-at-top
  from t5align.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from t5align.data import writers  # pylint: disable=g-import-not-at-top
  from t5align.train import pair_sources  # pylint: disable=g-import-not-at-top
  from t5align.train import stages  # pylint: disable=g-import-not-at-top
  feature_lengths = feature_lengths or stages.FeatureLengths()
  placement = (partitioning_config or stages.Partitioning()).placement()
  golden_policy_config = golden_policy_config or policy_config
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  arrays = tasks.tokenize_examples(writers.read_examples(d_golden), vocabulary,
                                   feature_lengths.as_dict())
  if not len(arrays["prompt"]):
    raise ValueError(f"{d_golden}: no preference examples")
  pairs = pair_sources.order_pairs(arrays["prompt"], arrays["response_a"], arrays["response_b"],
                                   arrays["label"])
  _, first_rows = np.unique(arrays["prompt"], axis=0, return_index=True)
  prompts = arrays["prompt"][np.sort(first_rows)]  # distinct prompts, in file order
  if online_stream is None and os.path.isdir(os.path.join(run_dir, "stream")):
    online_stream = os.path.join(run_dir, "stream")
  golden_pm_params = stages.best_checkpoint_params(golden_pm_run, golden_pm_config)
  fmt = stages.pair_format(vocabulary, feature_lengths)

  def golden_labels(pairs_to_label):
    placed = placement.params(golden_pm_params, golden_pm_config)
    margins = stages.preference_margins(
        placed, golden_pm_config, fmt, pairs_to_label["prompt"], pairs_to_label["chosen"],
        pairs_to_label["rejected"], pm_input_length=feature_lengths.pm_input_length,
        batch_size=batch_size, placement=placement)
    return np.asarray(preference.decide(np.asarray(margins)), np.float64)

  online_pairs, extra = None, {}
  if online_stream is not None:
    # Kept from the first evaluation: the stream of a run that is still
    # training grows, and every checkpoint must be classified on the same pairs.
    kept = os.path.join(output_dir, ONLINE_PAIRS_FILE)
    if os.path.exists(kept):
      with np.load(kept) as saved:
        online_pairs = {field: saved[field] for field in (*PAIR_FIELDS, "proxy_label")}
    else:
      online_pairs = _stream_sample(writers.read_stream(online_stream),
                                    num_classification_pairs, seed=seed)
      if online_pairs is None:
        raise ValueError(f"online stream {online_stream} has no recorded batches")
      online_pairs["proxy_label"] = online_pairs["label"]
      online_pairs["label"] = golden_labels(online_pairs)
      _write_npz(kept, online_pairs)
    extra["online_proxy_golden_agreement"] = float(np.mean(preference.agreement(
        online_pairs["proxy_label"].astype(np.float64), online_pairs["label"])))
  own_stream = os.path.join(run_dir, "stream")
  agreement_path = os.path.join(output_dir, STREAM_AGREEMENT_FILE)
  if os.path.isdir(own_stream) and not os.path.exists(agreement_path):
    bins = _stream_bins(own_stream, num_classification_pairs)
    for entry in bins:
      labels = golden_labels(entry.pop("pairs"))
      values = np.asarray(preference.agreement(entry.pop("proxy_label"), labels), np.float64)
      entry["proxy_golden_agreement"] = float(np.mean(values))
      entry["agreement_values"] = values.tolist()
    _write_json(agreement_path, {"stream": own_stream, "bins": bins})
  extra_metrics = None
  if oracle:
    from t5align.eval import oracle as oracle_lib  # pylint: disable=g-import-not-at-top
    extra_metrics = oracle_lib.validity_columns(vocabulary)
  return evaluate_run(
      run_dir=run_dir, policy_config=policy_config,
      sft_params=stages.load_params(sft_checkpoint, policy_config),
      golden_policy_params=stages.load_params(golden_policy_checkpoint, golden_policy_config),
      golden_pm_params=golden_pm_params, golden_pm_config=golden_pm_config,
      pair_format=fmt, prompts=prompts,
      d_golden_pairs=pairs, online_stream_pairs=online_pairs,
      golden_policy_config=golden_policy_config, steps=steps, include_sft=include_sft,
      num_kl_prompts=num_kl_prompts, num_winrate_prompts=num_winrate_prompts,
      num_classification_pairs=num_classification_pairs,
      max_decode_length=feature_lengths.targets, pm_input_length=feature_lengths.pm_input_length,
      batch_size=batch_size, seed=seed, output_path=os.path.join(output_dir, "eval.jsonl"),
      save_samples=save_samples, placement=placement, extra_metrics=extra_metrics,
      extra_columns=extra)


def _stream_bins(stream: str, pairs_per_bin: int) -> list[dict]:
  """Pairs near each of ``STREAM_BINS`` evenly spaced steps of a recorded stream.

  Bin ``k`` starts at the batch of position ``round(k * (n - 1) / (bins - 1))``
  of the ``n`` recorded batches and takes consecutive batches until it holds
  ``pairs_per_bin`` pairs (the paper's "64 pairs near each of 10 evenly spaced
  online checkpoints", App. E).
  """
  from t5align.data import writers  # pylint: disable=g-import-not-at-top
  steps = writers.stream_steps(stream)
  if not steps:
    return []
  count = min(STREAM_BINS, len(steps))
  starts = sorted({round(k * (len(steps) - 1) / max(count - 1, 1)) for k in range(count)})
  bins = []
  for start in starts:
    parts, held, position = [], 0, start
    while held < pairs_per_bin and position < len(steps):
      batch = writers.read_stream_batch(stream, steps[position])
      parts.append(batch)
      held += batch["prompt"].shape[0]
      position += 1
    pairs = {field: np.concatenate([p[field] for p in parts])[:pairs_per_bin]
             for field in PAIR_FIELDS}
    bins.append({"step": int(steps[start]), "last_step": int(steps[position - 1]),
                 "pairs": pairs, "num_pairs": int(pairs["prompt"].shape[0]),
                 "proxy_label": pairs["label"].astype(np.float64)})
  return bins


def _stream_sample(batches, k: int, *, seed: int) -> Optional[dict[str, np.ndarray]]:
  """A seeded uniform sample of ``k`` pairs from an iterable of stream batches.

  Reservoir sampling keeps memory at ``k`` pairs: a paper-sized stream (4k
  batches of 32 pairs, 1024-token prompts) would not fit whole in memory.
  """
  rng = np.random.default_rng([seed, PURPOSES["online_pairs"]])
  reservoir, seen = [], 0
  for _, batch in batches:
    for row in range(batch["prompt"].shape[0]):
      pair = {field: batch[field][row] for field in PAIR_FIELDS}
      if len(reservoir) < k:
        reservoir.append(pair)
      else:
        slot = rng.integers(0, seen + 1)
        if slot < k:
          reservoir[slot] = pair
      seen += 1
  if not reservoir:
    return None
  return {field: np.stack([pair[field] for pair in reservoir]) for field in PAIR_FIELDS}


class _Context:
  """What stays fixed across checkpoints: subsets, golden samples, SFT log-probs."""

  def __init__(self, *, policy_config, golden_policy_config, golden_pm_config, pair_format,
               prompts, sft_params, golden_policy_params, golden_pm_params, d_golden_pairs,
               online_stream_pairs, settings, placement, extra_metrics, progress):
    self.policy_config = policy_config
    self.extra_metrics = extra_metrics
    self.golden_pm_config = golden_pm_config
    self.pair_format = pair_format
    self.settings = settings
    self.placement = placement
    self.sft_params = placement.params(sft_params, policy_config)
    self.golden_pm_params = placement.params(golden_pm_params, golden_pm_config)
    seed, batch_size = settings["seed"], settings["batch_size"]
    num_prompts = prompts.shape[0]
    self.kl_indices = subset_indices(num_prompts, settings["num_kl_prompts"], seed=seed,
                                     purpose="kl_prompts")
    self.winrate_indices = subset_indices(num_prompts, settings["num_winrate_prompts"],
                                          seed=seed, purpose="winrate_prompts")
    self.kl_prompts = prompts[self.kl_indices]
    self.winrate_prompts = prompts[self.winrate_indices]
    self.pair_sets = {}
    for name, pairs, purpose, count in (
        ("d_golden", d_golden_pairs, "classification_pairs", settings["num_classification_pairs"]),
        ("online", online_stream_pairs, "online_pairs", settings["num_online_pairs"])):
      if pairs is None:
        continue
      indices = subset_indices(pairs["prompt"].shape[0], count, seed=seed, purpose=purpose)
      chosen_subset = {field: pairs[field][indices] for field in PAIR_FIELDS}
      progress(f"eval: SFT log-probs of {len(indices)} {name} pairs (computed once)")
      sft_logprobs = _pair_logprobs(self.sft_params, policy_config, chosen_subset, batch_size,
                                    placement)
      self.pair_sets[name] = (indices, chosen_subset, sft_logprobs)
    progress(f"eval: golden-policy samples for {len(self.winrate_indices)} prompts "
             "(drawn once, reused for every checkpoint)")
    golden_params = placement.params(golden_policy_params, golden_policy_config)
    golden_key = purpose_key(seed, "golden_samples")
    (self.golden_samples,) = placement.map_batches(
        lambda b, x: _draw(golden_params, golden_policy_config, x, golden_key, b,
                           settings["max_decode_length"]).tokens,
        [self.winrate_prompts], batch_size)

  def evaluate(self, params: Params) -> tuple[dict, dict]:
    """Metrics of one policy, and the per-example arrays behind them."""
    config, settings = self.policy_config, self.settings
    batch_size, length = settings["batch_size"], settings["max_decode_length"]
    kl_key = purpose_key(settings["seed"], "kl_samples")

    def kl_batch(b, x):
      y = _draw(params, config, x, kl_key, b, length).tokens
      return y, sampling.per_token_kl(params, self.sft_params, x, y, config=config)

    kl_samples, kl_values = self.placement.map_batches(kl_batch, [self.kl_prompts], batch_size)
    kl_values = kl_values.astype(np.float64)

    policy_key = purpose_key(settings["seed"], "policy_samples")

    def win_batch(b, x, y_golden):
      drawn = _draw(params, config, x, policy_key, b, length)
      margin = _golden_margin(self.golden_pm_params, x, drawn.tokens, y_golden,
                              config=self.golden_pm_config, fmt=self.pair_format,
                              max_length=settings["pm_input_length"])
      return drawn.tokens, drawn.lengths, margin

    policy_samples, lengths, margins = self.placement.map_batches(
        win_batch, [self.winrate_prompts, self.golden_samples], batch_size)
    wins = np.asarray(preference.decide(margins), np.float64)

    kl = float(np.mean(kl_values))
    metrics = {"kl": kl, "log_kl": math.log(kl) if kl > 0 else None,
               "kl_stderr": _stderr(kl_values),
               "win_rate": float(np.mean(wins)), "win_rate_stderr": _stderr(wins),
               "win_rate_ties": float(np.mean(margins == 0)),
               "response_length": float(np.mean(lengths))}
    arrays = {"kl_prompt_indices": self.kl_indices, "kl_samples": kl_samples,
              "kl_values": kl_values, "winrate_prompt_indices": self.winrate_indices,
              "policy_samples": policy_samples, "golden_samples": self.golden_samples,
              "margins": margins, "wins": wins}
    if self.extra_metrics is not None:
      columns, extra_arrays = self.extra_metrics(
          prompts=self.winrate_prompts, policy_samples=np.asarray(policy_samples),
          golden_samples=np.asarray(self.golden_samples), margins=np.asarray(margins))
      metrics.update(columns)
      arrays.update(extra_arrays)
    for name, (indices, pairs, sft_logprobs) in self.pair_sets.items():
      policy_logprobs = _pair_logprobs(params, config, pairs, batch_size, self.placement)
      f, result = _classify(policy_logprobs, sft_logprobs, pairs["label"])
      metrics[f"accuracy_{name}"] = result["accuracy"]
      if name == "d_golden":
        metrics["drift_winner"] = result["drift_winner"]
        metrics["drift_loser"] = result["drift_loser"]
      arrays[f"{name}_pair_indices"] = indices
      arrays[f"{name}_f"] = f
      arrays[f"{name}_correct"] = result["correct"]
      arrays[f"{name}_drift_winner"] = result["drift_winner_values"]
      arrays[f"{name}_drift_loser"] = result["drift_loser_values"]
    return metrics, arrays


def _classify(policy_logprobs, sft_logprobs, label) -> tuple[np.ndarray, dict]:
  """f = Delta with ``chosen`` as response 1; accuracy and log-likelihood drift."""
  policy_chosen, policy_rejected = (x.astype(np.float64) for x in policy_logprobs)
  sft_chosen, sft_rejected = (x.astype(np.float64) for x in sft_logprobs)
  drift_chosen, drift_rejected = policy_chosen - sft_chosen, policy_rejected - sft_rejected
  f = drift_chosen - drift_rejected
  predicted = np.asarray(preference.decide(f), np.float64)
  label = label.astype(np.float64)
  chosen_wins = label >= 0.5
  correct = np.asarray(preference.agreement(predicted, label), np.float64)
  drift_winner = np.where(chosen_wins, drift_chosen, drift_rejected)
  drift_loser = np.where(chosen_wins, drift_rejected, drift_chosen)
  return f, {"accuracy": float(np.mean(correct)), "drift_winner": float(np.mean(drift_winner)),
             "drift_loser": float(np.mean(drift_loser)), "correct": correct,
             "drift_winner_values": drift_winner, "drift_loser_values": drift_loser}


def _stderr(values: np.ndarray) -> float:
  """Standard error of the mean (population variance; sqrt(p(1-p)/n) for 0/1 values)."""
  return float(np.std(values) / math.sqrt(len(values)))


def _draw(params, config, prompts, key, batch_index, max_decode_length):
  return sampling.sample(params, prompts, config=config, rng=jax.random.fold_in(key, batch_index),
                         max_decode_length=max_decode_length)


@functools.partial(jax.jit, static_argnames=("config", "fmt", "max_length"))
def _golden_margin(pm_params, prompt, response, golden_response, *, config, fmt, max_length):
  """r(x, y, y_g) - r(x, y_g, y) ``[B]``: positive when the policy's sample wins."""
  return preference.symmetric_preference(pm_params, config, fmt, prompt, response,
                                         golden_response, max_length)["margin"]


def _pair_logprobs(params, config, pairs, batch_size, placement) -> tuple[np.ndarray, np.ndarray]:
  """Summed sequence log-probs ``([M], [M])`` of the chosen and rejected responses."""
  def batch(_, x, chosen, rejected):
    return (sampling.sequence_logprobs(params, x, chosen, config=config),
            sampling.sequence_logprobs(params, x, rejected, config=config))
  return placement.map_batches(batch, [pairs["prompt"], pairs["chosen"], pairs["rejected"]],
                               batch_size)


def _resolve_checkpoint_dir(run_dir, checkpoint_dir) -> str:
  if (run_dir is None) == (checkpoint_dir is None):
    raise ValueError("give exactly one of run_dir and checkpoint_dir, got "
                     f"run_dir={run_dir!r}, checkpoint_dir={checkpoint_dir!r}")
  if run_dir is not None:
    nested = os.path.join(run_dir, CHECKPOINT_SUBDIR)
    checkpoint_dir = nested if os.path.isdir(nested) else run_dir
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
  return checkpoint_dir


def _check_tokens(tokens, name: str) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty integer array [rows, length], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  if tokens.min() < 0:
    raise ValueError(f"{name} has a negative token id at row {int(np.argwhere(tokens < 0)[0, 0])}")
  return tokens.astype(np.int32)


def _check_pairs(pairs: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
  missing = [f for f in PAIR_FIELDS if f not in pairs]
  if missing:
    raise ValueError(f"{name} lacks field(s) {missing}; needs {list(PAIR_FIELDS)}")
  out = {f: _check_tokens(pairs[f], f"{name}['{f}']") for f in PAIR_FIELDS[:3]}
  label = np.asarray(pairs["label"], np.float64)
  rows = out["prompt"].shape[0]
  for field, array in (*out.items(), ("label", label)):
    if array.shape[0] != rows:
      raise ValueError(f"{name}['{field}'] has {array.shape[0]} rows, {name}['prompt'] has {rows}")
  if label.ndim != 1:
    raise ValueError(f"{name}['label'] must be a vector [rows], got shape {list(label.shape)}")
  bad = np.flatnonzero(~((label >= 0) & (label <= 1)))
  if bad.size:
    raise ValueError(f"{name}['label'] row {int(bad[0])}: label must be a probability in [0, 1], "
                     f"got {label[bad[0]]}")
  if out["chosen"].shape[1] != out["rejected"].shape[1]:
    raise ValueError(f"{name}: chosen and rejected must have one width, got "
                     f"{out['chosen'].shape[1]} and {out['rejected'].shape[1]}")
  out["label"] = label
  return out


def _check_params(params, config: t5.T5Config, what: str) -> None:
  """Raises ValueError naming the first parameter whose name or shape differs from ``config``."""
  def by_name(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  expected, got = by_name(t5.abstract_params(config)), by_name(params)
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(f"{what}: parameter names do not match the T5 config: missing {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                     f"{' ...' if len(extra) > 5 else ''}")
  for name in sorted(expected):
    if tuple(got[name]) != tuple(expected[name]):
      raise ValueError(f"{what}: parameter {name} has shape {tuple(got[name])}, the T5 config "
                       f"expects {tuple(expected[name])}")


def _check_vocabularies(policy_config, golden_policy_config, pm_config, fmt) -> None:
  if golden_policy_config.vocab_size != policy_config.vocab_size:
    raise ValueError(f"the golden policy's vocab_size {golden_policy_config.vocab_size} differs "
                     f"from the policy's {policy_config.vocab_size}")
  ids = (*fmt.response_1_marker, *fmt.response_2_marker, *fmt.suffix, fmt.first_token,
         fmt.second_token)
  if pm_config.vocab_size < policy_config.vocab_size or max(ids) >= pm_config.vocab_size:
    raise ValueError(f"the golden PM's vocab_size {pm_config.vocab_size} must cover the policy "
                     f"vocabulary ({policy_config.vocab_size}) and the pair-format ids {ids}")


def _check_settings(rows: list[dict], settings: dict, path: str) -> None:
  for line, row in enumerate(rows, start=1):
    for field in SETTINGS_FIELDS:
      if row.get(field) != settings[field]:
        raise ValueError(
            f"{path}: line {line} (step {row.get('step')}) was evaluated with {field}="
            f"{row.get(field)!r}, this call uses {settings[field]!r}; rows of one file must share "
            f"their settings: pass another output_path")


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(
      os.path.abspath(path)))
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _write_jsonl(path: str, rows: list[dict]) -> None:
  _atomic_write(path, lambda f: f.writelines(json.dumps(r, allow_nan=False) + "\n"
                                             for r in rows))


def _write_csv(path: str, rows: list[dict]) -> None:
  fields = [c for c in COLUMNS if any(c in r for r in rows)]
  fields += sorted({k for r in rows for k in r} - set(fields))

  def write(f):
    writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
  _atomic_write(path, write)


def _write_json(path: str, obj) -> None:
  _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")
