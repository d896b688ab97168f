"""The protocol's gates: is the set-up a fair test, measured before any policy run.

The paper's comparison rests on premises that can be checked before online
and offline are ever trained (docs/results/README.md, "Protocol"):

* **SFT fits D_golden** (App. C trains about 3 epochs): its samples look like
  D_golden's responses, so D_golden is "SFT-vs-SFT"-like data. Measured on
  ``num_prompts`` D_golden prompts: per-token log-likelihood under SFT and
  length of D_golden's responses and of two SFT samples per prompt; in the
  miniature world also their oracle quality, hallucinations and repetitions.
* **The PMs are at their validation plateau** and the best checkpoint is used.
* **The proxy PM agrees with the golden PM** in distribution (the proxy's
  validation accuracy on golden labels) and on SFT-sample pairs, the data
  online training starts on.
* **The golden PM judges like the oracle** (miniature world only): its
  decisions against the oracle's order on held-out D_initial pairs and on
  SFT-sample pairs.

Every gate has a rule fixed here, before any policy result exists; a failed
gate is reported in the study's report, never hidden (the study goes on).
Outputs in ``output_dir``: ``gates.json`` and ``gates.md``.
"""

import json
import os
from typing import Optional

import jax
import numpy as np

from t5align import sampling
from t5align.data import tasks
from t5align.data import vocab as vocab_lib
from t5align.data import writers
from t5align.eval import evaluate
from t5align.models import preference
from t5align.models import t5
from t5align.train import stages

GATES_FILE = "gates.json"
# Rules (the thresholds are part of the protocol; see the module docstring).
SFT_EPOCHS_RANGE = (2.5, 4.0)
LENGTH_RATIO_RANGE = (0.8, 1.25)
MAX_QUALITY_GAP = 0.5  # oracle units: half a repeated word per response
PLATEAU_MIN_GAIN = 0.01
MAX_AGREEMENT_DROP = 0.10


def _say(message: str) -> None:
  print(f"[t5align] gates: {message}", flush=True)


def plateau(best_checkpoint_json: str) -> dict:
  """A PM run's validation curve: best and last step, and whether it has levelled off.

  Levelled off: the best checkpoint is not the last one, or the last one
  gains less than ``PLATEAU_MIN_GAIN`` over the one before it.
  """
  with open(best_checkpoint_json) as f:
    record = json.load(f)
  curve = sorted((int(step), float(acc)) for step, acc in record["all"].items())
  last_step, last = curve[-1]
  gain = last - curve[-2][1] if len(curve) > 1 else float("inf")
  return {"best_step": int(record["step"]), "best_accuracy": float(record["validation_accuracy"]),
          "last_step": last_step, "last_accuracy": last, "last_gain": gain,
          "levelled_off": int(record["step"]) != last_step or gain < PLATEAU_MIN_GAIN,
          "curve": curve}


def _mean_per_token(logprobs: np.ndarray, tokens: np.ndarray) -> float:
  lengths = np.maximum((tokens != 0).sum(axis=1), 1)
  return float(np.mean(logprobs / lengths))


def _decide(margins) -> np.ndarray:
  return np.asarray(preference.decide(np.asarray(margins)), np.float64)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(np.asarray(preference.agreement(a, b))))


def _gate(name: str, value, rule: str, passed: Optional[bool]) -> dict:
  return {"gate": name, "value": value, "rule": rule, "passed": passed}


def gates_stage(*, output_dir: str, task: str, policy_config: t5.T5Config, sft_run: str,
                golden_pm_run: str, golden_pm_config: t5.T5Config, proxy_pm_run: str,
                proxy_pm_config: t5.T5Config, d_golden: str, d_initial_validation: str,
                sft_epochs: Optional[float], num_prompts: int = 256, batch_size: int = 32,
                seed: int = 0, vocabulary_path: Optional[str] = None,
                feature_lengths: stages.FeatureLengths = stages.FeatureLengths(),
                partitioning_config: stages.Partitioning = stages.Partitioning()) -> dict:
  """Measures the gates (module docstring) and writes ``gates.json`` / ``gates.md``."""
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  lengths = feature_lengths.as_dict()
  placement = partitioning_config.placement()
  placement.check_batch_size(batch_size)
  fmt = stages.pair_format(vocabulary, feature_lengths)
  mini = task == "mini"

  examples = stages.unique_prompt_examples(d_golden)
  chosen = evaluate.subset_indices(len(examples), num_prompts, seed=seed, purpose="kl_prompts")
  examples = [examples[i] for i in chosen]
  arrays = tasks.tokenize_examples(examples, vocabulary, lengths)
  prompts = arrays["prompt"]

  sft = placement.params(stages.load_params(sft_run, policy_config), policy_config)
  key = jax.random.fold_in(jax.random.key(seed), 101)

  def draw(b, x):
    out = sampling.sample(sft, x, config=policy_config, rng=jax.random.fold_in(key, b),
                          num_samples=2, max_decode_length=feature_lengths.targets)
    tokens = out.tokens.reshape(x.shape[0], 2, -1)  # rows are grouped per prompt
    return tokens[:, 0], tokens[:, 1]

  sample_1, sample_2 = placement.map_batches(draw, [prompts], batch_size)

  def logprobs(x, y):
    (values,) = placement.map_batches(
        lambda _, xb, yb: sampling.sequence_logprobs(sft, xb, yb, config=policy_config),
        [x, y], batch_size)
    return np.asarray(values, np.float64)

  responses = np.concatenate([arrays["response_a"], arrays["response_b"]])
  samples = np.concatenate([sample_1, sample_2])
  both_prompts = np.concatenate([prompts, prompts])
  fit = {
      "prompts": int(len(prompts)), "sft_epochs": sft_epochs,
      "d_golden_loglik_per_token": _mean_per_token(logprobs(both_prompts, responses), responses),
      "sft_sample_loglik_per_token": _mean_per_token(logprobs(both_prompts, samples), samples),
      "d_golden_length": float(np.mean((responses != 0).sum(axis=1))),
      "sft_sample_length": float(np.mean((samples != 0).sum(axis=1)))}

  def pm_decisions(run, config, x, y1, y2):
    params = placement.params(stages.best_checkpoint_params(run, config), config)
    return _decide(stages.preference_margins(
        params, config, fmt, x, y1, y2, pm_input_length=feature_lengths.pm_input_length,
        batch_size=batch_size, placement=placement))

  golden_on_sft = pm_decisions(golden_pm_run, golden_pm_config, prompts, sample_1, sample_2)
  proxy_on_sft = pm_decisions(proxy_pm_run, proxy_pm_config, prompts, sample_1, sample_2)
  golden_curve = plateau(os.path.join(golden_pm_run, "best_checkpoint.json"))
  proxy_curve = plateau(os.path.join(proxy_pm_run, "best_checkpoint.json"))
  agreement = {"proxy_golden_in_distribution": proxy_curve["best_accuracy"],
               "proxy_golden_sft_pairs": _agreement(proxy_on_sft, golden_on_sft)}

  ratio = fit["sft_sample_length"] / max(fit["d_golden_length"], 1e-9)
  results = [
      _gate("SFT epochs over its targets", sft_epochs,
            f"in [{SFT_EPOCHS_RANGE[0]}, {SFT_EPOCHS_RANGE[1]}] (paper App. C: 3-4)",
            None if sft_epochs is None
            else SFT_EPOCHS_RANGE[0] <= sft_epochs <= SFT_EPOCHS_RANGE[1]),
      _gate("SFT sample length / D_golden response length", ratio,
            f"in [{LENGTH_RATIO_RANGE[0]}, {LENGTH_RATIO_RANGE[1]}]",
            LENGTH_RATIO_RANGE[0] <= ratio <= LENGTH_RATIO_RANGE[1]),
      _gate("golden PM at its validation plateau", golden_curve["best_accuracy"],
            f"best checkpoint not the last, or the last gains < {PLATEAU_MIN_GAIN}",
            golden_curve["levelled_off"]),
      _gate("proxy PM at its validation plateau", proxy_curve["best_accuracy"],
            f"best checkpoint not the last, or the last gains < {PLATEAU_MIN_GAIN}",
            proxy_curve["levelled_off"]),
      _gate("proxy-golden agreement on SFT-sample pairs", agreement["proxy_golden_sft_pairs"],
            f">= in-distribution agreement ({agreement['proxy_golden_in_distribution']:.3f}) "
            f"- {MAX_AGREEMENT_DROP}",
            agreement["proxy_golden_sft_pairs"]
            >= agreement["proxy_golden_in_distribution"] - MAX_AGREEMENT_DROP)]

  if mini:
    from t5align.eval import oracle  # pylint: disable=g-import-not-at-top
    texts = [e.prompt for e in examples]
    d_quality = oracle.quality(texts * 2, [e.response_a for e in examples]
                               + [e.response_b for e in examples])
    s_quality = oracle.quality(texts * 2, oracle.decode_rows(vocabulary, samples))
    for name, values in (("d_golden", d_quality), ("sft_sample", s_quality)):
      for field in ("quality", "hallucinations", "repetitions"):
        fit[f"{name}_oracle_{field}"] = float(np.mean(values[field]))
    n = len(texts)
    oracle_on_sft = oracle.oracle_order(s_quality["quality"][:n], s_quality["quality"][n:])
    held_out = writers.read_examples(d_initial_validation)
    val = tasks.tokenize_examples(held_out, vocabulary, lengths)
    golden_on_val = pm_decisions(golden_pm_run, golden_pm_config, val["prompt"],
                                 val["response_a"], val["response_b"])
    val_quality = [oracle.quality([e.prompt for e in held_out], [getattr(e, side) for e in held_out])
                   ["quality"] for side in ("response_a", "response_b")]
    agreement["golden_oracle_in_distribution"] = _agreement(
        golden_on_val, oracle.oracle_order(*val_quality))
    agreement["golden_oracle_sft_pairs"] = _agreement(golden_on_sft, oracle_on_sft)
    gap = fit["sft_sample_oracle_quality"] - fit["d_golden_oracle_quality"]
    results.insert(2, _gate("SFT sample oracle quality - D_golden's", gap,
                            f"|gap| <= {MAX_QUALITY_GAP}", abs(gap) <= MAX_QUALITY_GAP))
    results.append(_gate(
        "golden PM-oracle agreement on SFT-sample pairs", agreement["golden_oracle_sft_pairs"],
        f">= in-distribution agreement ({agreement['golden_oracle_in_distribution']:.3f}) "
        f"- {MAX_AGREEMENT_DROP}",
        agreement["golden_oracle_sft_pairs"]
        >= agreement["golden_oracle_in_distribution"] - MAX_AGREEMENT_DROP))

  record = {"gates": results, "sft_fit": fit, "agreement": agreement,
            "golden_pm": golden_curve, "proxy_pm": proxy_curve}
  os.makedirs(output_dir, exist_ok=True)
  stages.write_json_atomic(os.path.join(output_dir, GATES_FILE), record)
  table = gates_markdown(record)
  stages.write_text_atomic(os.path.join(output_dir, "gates.md"), table + "\n")
  _say("measured before any policy run:\n" + table)
  return record


def _value(value) -> str:
  if value is None:
    return "n/a"
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def gates_markdown(record: dict) -> str:
  """The gates as a markdown table, then the measurements behind them."""
  lines = ["| gate | value | rule | result |", "|---|---:|---|---|"]
  for g in record["gates"]:
    result = {True: "pass", False: "**FAIL**", None: "not applicable"}[g["passed"]]
    lines.append(f"| {g['gate']} | {_value(g['value'])} | {g['rule']} | {result} |")
  lines += ["", "| measurement | value |", "|---|---:|"]
  for section in ("sft_fit", "agreement"):
    for name, value in record[section].items():
      lines.append(f"| {name} | {_value(value)} |")
  for pm in ("golden_pm", "proxy_pm"):
    c = record[pm]
    lines.append(f"| {pm} validation: best step {c['best_step']} ({c['best_accuracy']:.3f}), "
                 f"last step {c['last_step']} ({c['last_accuracy']:.3f}) | |")
  return "\n".join(lines)
