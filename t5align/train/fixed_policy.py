"""Fixed-policy pair datasets: samples from two given checkpoints, labelled by the golden PM.

The paper's offline datasets other than D_golden (Fig. 5 and Fig. 12) pair a
response of one fixed policy with a response of another (or the same) fixed
policy on every D_golden prompt, and the golden preference model orders each
pair with the decision rule:

* D_4k-vs-4k: both responses from the final (4k-step) online IPO policy;
* D_sft-vs-800: pi_sft against the online policy at step 800;
* D_800-vs-4k: the online policy at step 800 against step 4k.

``fixed_policy_pairs`` builds one such dataset: one pair per distinct prompt of
the prompts file (first-seen order), ``response_a`` sampled from ``policy_a``
and ``response_b`` from ``policy_b``, ``label`` = P(a preferred) in {0, 1/2, 1}
from ``preference.decide`` on the golden PM's symmetric margin.

Randomness: side a draws with ``fold_in(key(seed), 0)`` and side b with
``fold_in(key(seed), 1)`` (then ``fold_in(., first row of the batch)``), so the
two responses of a pair are independent draws even when both sides are the same
checkpoint. Separate streams matter for different checkpoints too: the sampler
is an inverse-CDF draw, and feeding two similar policies the same uniforms
would give strongly correlated responses. A dataset is a function of the
arguments, ``seed`` and ``batch_size`` included.

Token exactness (the paper's App. F: store token ids, not text): the labels are
computed on the sampled token ids, exactly as the online pair source does. The
text file is what later stages read, and its responses are re-tokenised there
(``tasks.tokenize_examples``). Re-tokenising is not always the identity:
SentencePiece may segment the decoded text differently from how the policy
emitted it (e.g. a sub-word piece glued to the previous word), ids beyond the
SentencePiece model decode to UNK, and a response that hit the target length
without EOS keeps ``T`` tokens when sampled but ``T - 1`` plus EOS when
re-tokenised. When any response of the dataset is affected, the sampled ids are
also written, row-aligned with the text file, to ``<output_data>.tokens.npz``:

  prompt      int32 [N, L]  policy encoder input (as ``tasks.tokenize_examples``)
  response_a  int32 [N, T]  sampled tokens, EOS-terminated or T tokens without EOS
  response_b  int32 [N, T]  the same for side b
  label       float32 [N]   P(response_a preferred), equal to the text file's labels

(the online stream's layout), and the summary says how many responses
re-tokenise exactly and how often the golden PM's decision on the re-tokenised
pairs agrees with the stored labels. Without such a response no side file
exists (a stale one from an earlier attempt is removed).

Pairs in which either response decodes to an empty (or whitespace-only) string
are dropped and counted: the text format cannot hold them.
"""

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5align import partitioning
from t5align import sampling
from t5align.data import schema
from t5align.data import tasks
from t5align.data import vocab as vocab_lib
from t5align.data import writers
from t5align.models import preference as preference_model
from t5align.models import t5
from t5align.train import checkpoints
from t5align.train import stages

def _say(message: str) -> None:
  print(f"[t5align] fixed_policy_pairs: {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class _Policy:
  """A resolved policy checkpoint: what to load, and its name in ``source``."""
  path: str
  step: Optional[int]  # None: not a t5align checkpoint directory (imported, or one step dir)
  checkpoints_dir: Optional[str]
  name: str


def _checkpoints_dir(path: str) -> Optional[str]:
  for candidate in (path, os.path.join(path, stages.CHECKPOINT_SUBDIR)):
    if os.path.isdir(candidate) and checkpoints.list_steps(candidate):
      return candidate
  return None


def _run_name(checkpoints_dir: str) -> str:
  if os.path.basename(checkpoints_dir) == stages.CHECKPOINT_SUBDIR:
    return os.path.basename(os.path.dirname(checkpoints_dir))
  return os.path.basename(checkpoints_dir)


def _resolve(path: str, step: Optional[int], side: str) -> _Policy:
  """Finds the checkpoint directory of a run and pins the step (default: its latest)."""
  path = os.path.abspath(path)
  ckpt_dir = _checkpoints_dir(path)
  if ckpt_dir is not None:
    available = checkpoints.list_steps(ckpt_dir)
    if step is None:
      step = available[-1]
    elif step not in available:
      raise FileNotFoundError(f"policy_{side}: no checkpoint for step_{side}={step} in {ckpt_dir}; "
                              f"have {available}")
    return _Policy(path, step, ckpt_dir, f"{_run_name(ckpt_dir)}@{step}")
  if step is not None:
    raise ValueError(f"policy_{side}: step_{side}={step} needs a t5align run or checkpoint "
                     f"directory, but {path} has no saved steps")
  if os.path.isdir(os.path.join(path, checkpoints.STATE)):  # one step directory <dir>/<step>
    return _Policy(path, None, None, f"{_run_name(os.path.dirname(path))}@{os.path.basename(path)}")
  return _Policy(path, None, None, os.path.basename(path))


def _load(policy: _Policy, config: t5.T5Config):
  """The policy's float32 parameters, checked against ``config``."""
  if policy.checkpoints_dir is None:
    return stages.load_params(policy.path, config)
  params = checkpoints.load_params(policy.checkpoints_dir, policy.step)
  return stages.checked_params(
      params, config, where=f"checkpoint {policy.checkpoints_dir} step {policy.step}")


def _sample_all(params, prompts: np.ndarray, *, config: t5.T5Config, key, batch_size: int,
                max_decode_length: int, temperature: float,
                placement: partitioning.Placement) -> np.ndarray:
  """One response per prompt: int32 ``[N, max_decode_length]``, 0 after EOS.

  ``params`` are placed by ``placement``; the batch starting at prompt ``i``
  draws with ``fold_in(key, i)``.
  """
  def draw(b, x):
    return sampling.sample(params, x, config=config, rng=jax.random.fold_in(key, b * batch_size),
                           max_decode_length=max_decode_length, temperature=temperature).tokens
  (tokens,) = placement.map_batches(draw, [prompts], batch_size)
  return tokens


def _response_ids(row: np.ndarray) -> list[int]:
  """A sampled row's response ids: everything before EOS (0 never occurs before it)."""
  ids = [int(t) for t in row]
  return ids[: ids.index(t5.EOS_ID)] if t5.EOS_ID in ids else ids


def _labels(pm_params, pm_config, fmt, prompt, response_a, response_b, *, pm_input_length,
            batch_size, placement) -> np.ndarray:
  margins = stages.preference_margins(pm_params, pm_config, fmt, prompt, response_a, response_b,
                                      pm_input_length=pm_input_length, batch_size=batch_size,
                                      placement=placement)
  return np.asarray(preference_model.decide(jnp.asarray(margins)))


def _write_tokens_atomic(path: str, arrays: dict) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def fixed_policy_pairs(*, policy_a: str, policy_b: str, model_config: t5.T5Config,
                       golden_pm_run: str, golden_pm_config: t5.T5Config, prompts_data: str,
                       output_data: str, step_a: Optional[int] = None,
                       step_b: Optional[int] = None, batch_size: int = 32,
                       temperature: float = 1.0, vocabulary_path: Optional[str] = None,
                       feature_lengths: stages.FeatureLengths = stages.FeatureLengths(),
                       partitioning_config: stages.Partitioning = stages.Partitioning(),
                       seed: int = 0, source_name: Optional[str] = None) -> dict:
  """Writes one golden-labelled pair (a from ``policy_a``, b from ``policy_b``) per prompt.

  Args:
    policy_a, policy_b: a t5align run directory, its checkpoints directory, one
      step directory, or an imported HF / T5X checkpoint (``stages.load_params``).
      Both may be the same checkpoint (D_4k-vs-4k): the responses are still
      independent draws.
    model_config: the policies' ``T5Config``.
    golden_pm_run, golden_pm_config: the golden PM run (its best-validation
      checkpoint, ``stages.best_checkpoint_params``) and its config.
    prompts_data: a preference file (e.g. D_golden); its distinct prompts are used.
    output_data: the preference file to write; if it exists nothing is done.
    step_a, step_b: the checkpoint step of a run's checkpoints directory;
      None = the latest (pinned when the call starts).
    batch_size: rows per sampling / scoring call.
    temperature: sampling temperature (1.0: the policy itself; 0 is greedy, so
      both sides of one checkpoint would then coincide).
    vocabulary_path: SentencePiece model; None = the mini vocabulary.
    feature_lengths: prompt length L, response length T and the PM input length.
    partitioning_config: the mesh and rule set the policies and the golden PM
      are placed on (one model at a time); ``batch_size`` must divide over its
      'data' axis.
    seed: the dataset's randomness (see the module docstring).
    source_name: the examples' ``source``; default
      ``"golden_pm:<name_a>-vs-<name_b>"`` with names like ``online_ipo@800``.

  Returns:
    A summary dict (also printed), or ``{"skipped": True}`` if ``output_data`` exists.
  """
  if os.path.exists(output_data):
    _say(f"{output_data} exists; nothing to do")
    return {"skipped": True}
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  lengths = feature_lengths.as_dict()
  fmt = stages.pair_format(vocabulary, feature_lengths)
  placement = partitioning_config.placement()
  placement.check_batch_size(batch_size)
  firsts = stages.unique_prompt_examples(prompts_data)
  prompts = tasks.tokenize_examples(firsts, vocabulary, lengths)["prompt"]
  side_a, side_b = _resolve(policy_a, step_a, "a"), _resolve(policy_b, step_b, "b")
  source = source_name or f"golden_pm:{side_a.name}-vs-{side_b.name}"
  _say(f"{len(prompts)} prompts of {prompts_data}; a = {side_a.name}, b = {side_b.name}")

  # One model resident at a time: policy a, policy b (unless the same), then the PM.
  key = jax.random.key(seed)
  sample_kw = dict(config=model_config, batch_size=batch_size, placement=placement,
                   max_decode_length=feature_lengths.targets, temperature=temperature)
  params = placement.params(_load(side_a, model_config), model_config)
  tokens_a = _sample_all(params, prompts, key=jax.random.fold_in(key, 0), **sample_kw)
  if side_b != side_a:
    del params
    params = placement.params(_load(side_b, model_config), model_config)
  tokens_b = _sample_all(params, prompts, key=jax.random.fold_in(key, 1), **sample_kw)
  del params

  ids_a = [_response_ids(row) for row in tokens_a]
  ids_b = [_response_ids(row) for row in tokens_b]
  texts_a = [vocabulary.decode(ids) for ids in ids_a]
  texts_b = [vocabulary.decode(ids) for ids in ids_b]
  kept = np.asarray([bool(a.strip()) and bool(b.strip()) for a, b in zip(texts_a, texts_b)])
  if not kept.any():
    raise ValueError(f"every sampled pair for {prompts_data} has an empty response; nothing to "
                     "write")
  rows = np.flatnonzero(kept)
  prompts, tokens_a, tokens_b = prompts[rows], tokens_a[rows], tokens_b[rows]

  pm_params = placement.params(stages.best_checkpoint_params(golden_pm_run, golden_pm_config),
                               golden_pm_config)
  score_kw = dict(pm_input_length=feature_lengths.pm_input_length, batch_size=batch_size,
                  placement=placement)
  labels = _labels(pm_params, golden_pm_config, fmt, prompts, tokens_a, tokens_b, **score_kw)
  examples = [
      schema.PreferenceExample(
          prompt=firsts[i].prompt, response_a=texts_a[i], response_b=texts_b[i],
          label=float(label), task=firsts[i].task, source=source,
          example_id=f"{firsts[i].example_id}:{side_a.name}-vs-{side_b.name}")
      for i, label in zip(rows, labels)]

  retokenized = tasks.tokenize_examples(examples, vocabulary, lengths)
  exact_a = np.all(retokenized["response_a"] == tokens_a, axis=1)
  exact_b = np.all(retokenized["response_b"] == tokens_b, axis=1)
  side_file = writers.tokens_path(output_data)
  if exact_a.all() and exact_b.all():
    retokenized_agreement = 1.0
    if os.path.exists(side_file):
      os.remove(side_file)  # left by an earlier attempt with other samples
    side_file = None
  else:
    retokenized_labels = _labels(pm_params, golden_pm_config, fmt, retokenized["prompt"],
                                 retokenized["response_a"], retokenized["response_b"], **score_kw)
    retokenized_agreement = float(np.mean(retokenized_labels == labels))
    # Before the text file: a rerun skips once the text file exists, so the side
    # file must already be there by then.
    _write_tokens_atomic(side_file, {"prompt": prompts.astype(np.int32),
                                     "response_a": tokens_a.astype(np.int32),
                                     "response_b": tokens_b.astype(np.int32),
                                     "label": labels.astype(np.float32)})
  writers.write_examples(output_data, examples)

  def mean_length(tokens):
    return float(np.mean(np.sum((tokens != t5.PAD_ID) & (tokens != t5.EOS_ID), axis=1)))

  summary = {
      "pairs": len(examples),
      "prompts": len(firsts),
      "skipped_empty": int(len(firsts) - len(examples)),
      "ties": int(np.sum(labels == 0.5)),
      "a_win_fraction": float(np.mean(labels == 1.0)),
      "mean_response_tokens_a": mean_length(tokens_a),
      "mean_response_tokens_b": mean_length(tokens_b),
      "truncated_responses": int(np.sum(~np.any(tokens_a == t5.EOS_ID, axis=1))
                                 + np.sum(~np.any(tokens_b == t5.EOS_ID, axis=1))),
      "token_exact_fraction": float(np.mean(np.concatenate([exact_a, exact_b]))),
      "retokenized_label_agreement": retokenized_agreement,
      "source": source,
      "output": output_data,
      "tokens_file": side_file,
  }
  _say(str(summary))
  return summary
