"""Token layouts and seqio tasks for every use of a preference dataset.

Uses (one seqio task each, registered by `register_tasks`, never at import):

* ``policy``: inputs = prompt, targets = response_a. Sampling and evaluation
  read the prompts; the targets are there for scoring.
* ``sft``: both responses of every pair are targets (the paper's SFT set), so
  one pair gives two examples with the same inputs.
* ``pm``: the preference model's training data. Each pair is presented in a
  random order (probability 1/2 each, seeded by seqio) and the label is
  flipped with it: the order-randomised loss of the paper's App. A.1.
* ``pm_ordered``: the same, in the stored order (validation accuracy, labelling).

The pm tasks' inputs serialise prompt, response 1 and response 2 with the
fixed markers below (`serialize_pair` shows the layout as text); the target is
the token of "1" if label >= 0.5 else "2", followed by EOS, and ``label``
(P(response 1 is better), float32) is a feature too, for soft-label losses.

Token layout and THE truncation rule (T5: pad = 0, EOS = vocabulary.eos_id;
L = inputs length, T = targets length, paper: L = 1024, T = 128):

* prompt -> encoder input: the last L - 1 prompt tokens, then EOS. Cutting
  from the left keeps the latest dialogue turns and the task suffix
  ("TL;DR:", "Assistant:").
* response -> decoder target: the first T - 1 response tokens, then EOS, so
  EOS is always the last token.
* preference-model input: ``prompt M1 response_1 M2 response_2 Q EOS`` where
  M1, M2, Q are the marker tokens. Each response is cut at the right to its
  first T - 1 tokens (exactly the body of its decoder target); the prompt gets
  the rest of the L tokens and is cut from the left. Every segment is
  tokenized on its own, so the PM input of sampled responses is built from
  their token ids directly (`pair_input_ids`), with no detokenize/retokenize.

The same rule has two implementations that must agree token for token: the
graph-mode seqio preprocessors, and plain numpy (`tokenize_examples`,
`pair_input_ids`) for the training loop's pair batches and the preference
model's scoring of sampled responses. `truncation_stats` counts what the rule
cut.
"""

import dataclasses
import functools
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from t5align.data import schema
from t5align.data import tfds_builders
from t5align.data import writers
from t5align.models import preference

INPUTS, TARGETS = "inputs", "targets"
PAPER_FEATURE_LENGTHS = {INPUTS: 1024, TARGETS: 128}
USES = ("policy", "sft", "pm", "pm_ordered")

# The preference model's fixed markers and answers. Changing any of them
# changes what every preference model was trained on. The space before the
# markers' colon keeps the number a word of its own; the miniature world's
# golden PM learns much faster with it ("response 1:" measured 0.61 vs 0.70
# held-out agreement after 800 steps, docs/mini_world.md).
PM_RESPONSE_1_MARKER = "response 1 :"
PM_RESPONSE_2_MARKER = "response 2 :"
PM_QUESTION = "better response:"
PM_TARGET_1 = "1"  # response 1 is better
PM_TARGET_2 = "2"  # response 2 is better


def serialize_pair(prompt: str, response_1: str, response_2: str) -> str:
  """The preference model's input as text: prompt, markers and both responses.

  This is the human-readable form (and seqio's ``inputs_pretokenized``). Token
  ids are the concatenation of each segment tokenized on its own, truncated by
  the module's rule; see `pair_input_ids`.
  """
  return " ".join((prompt, PM_RESPONSE_1_MARKER, response_1, PM_RESPONSE_2_MARKER, response_2,
                   PM_QUESTION))


def _lengths(feature_lengths: Mapping[str, int]) -> tuple[int, int]:
  try:
    inputs_length, targets_length = int(feature_lengths[INPUTS]), int(feature_lengths[TARGETS])
  except KeyError as e:
    raise ValueError(f"feature_lengths needs {INPUTS!r} and {TARGETS!r}, got {dict(feature_lengths)}") from e
  if inputs_length < 2 or targets_length < 2:
    raise ValueError(f"feature lengths must be >= 2 (a token and EOS), got {dict(feature_lengths)}")
  return inputs_length, targets_length


@dataclasses.dataclass(frozen=True)
class PairFormat:
  """Everything the token layouts need: lengths, EOS and the PM marker ids."""
  inputs_length: int
  targets_length: int
  eos_id: int
  response_1_marker: tuple[int, ...]
  response_2_marker: tuple[int, ...]
  question: tuple[int, ...]
  target_1_id: int
  target_2_id: int

  def for_model(self) -> "preference.PairFormat":
    """The same layout for ``t5align.models.preference`` (jittable, token-level)."""
    return preference.PairFormat(self.response_1_marker, self.response_2_marker,
                                 self.target_1_id, self.target_2_id, suffix=self.question)

  @property
  def pm_fixed_tokens(self) -> int:
    """Tokens of a PM input that are not prompt or response: markers and EOS."""
    return len(self.response_1_marker) + len(self.response_2_marker) + len(self.question) + 1


def pair_format(vocabulary: seqio.Vocabulary,
                feature_lengths: Mapping[str, int] = PAPER_FEATURE_LENGTHS) -> PairFormat:
  """Tokenizes the markers with ``vocabulary`` and checks the layout fits the lengths."""
  inputs_length, targets_length = _lengths(feature_lengths)

  def encode_marker(text: str) -> tuple[int, ...]:
    ids = tuple(int(i) for i in vocabulary.encode(text))
    if not ids or vocabulary.unk_id in ids:
      raise ValueError(f"PM marker {text!r} does not tokenize cleanly with this vocabulary "
                       f"(ids {ids}, unk = {vocabulary.unk_id}); the vocabulary must cover it")
    return ids

  def encode_target(text: str) -> int:
    ids = encode_marker(text)
    if len(ids) != 1:
      raise ValueError(f"PM target {text!r} must be one token with this vocabulary, got ids {ids}")
    return ids[0]

  fmt = PairFormat(
      inputs_length=inputs_length, targets_length=targets_length, eos_id=int(vocabulary.eos_id),
      response_1_marker=encode_marker(PM_RESPONSE_1_MARKER),
      response_2_marker=encode_marker(PM_RESPONSE_2_MARKER),
      question=encode_marker(PM_QUESTION),
      target_1_id=encode_target(PM_TARGET_1), target_2_id=encode_target(PM_TARGET_2))
  if fmt.response_1_marker == fmt.response_2_marker or fmt.target_1_id == fmt.target_2_id:
    raise ValueError("this vocabulary gives the two responses' markers or targets the same ids")
  # At least one prompt token must fit next to two full-length responses.
  needed = fmt.pm_fixed_tokens + 2 * (targets_length - 1) + 1
  if inputs_length < needed:
    raise ValueError(f"inputs length {inputs_length} cannot hold a PM input: markers and EOS "
                     f"({fmt.pm_fixed_tokens}) + 2 responses of {targets_length - 1} tokens + 1 "
                     f"prompt token need {needed}")
  return fmt


# ------------------------------------------------------------------ numpy path


def prompt_input_ids(prompt_ids: Sequence[int], inputs_length: int, eos_id: int) -> np.ndarray:
  """Encoder input of a policy: the last L - 1 prompt tokens, then EOS (unpadded, int32)."""
  kept = np.asarray(prompt_ids, np.int32)[max(len(prompt_ids) - (inputs_length - 1), 0):]
  return np.append(kept, np.int32(eos_id))


def response_target_ids(response_ids: Sequence[int], targets_length: int, eos_id: int) -> np.ndarray:
  """Decoder target: the first T - 1 response tokens, then EOS (unpadded, int32)."""
  kept = np.asarray(response_ids, np.int32)[:targets_length - 1]
  return np.append(kept, np.int32(eos_id))


def pair_input_ids(prompt_ids: Sequence[int], response_1_ids: Sequence[int],
                   response_2_ids: Sequence[int], fmt: PairFormat) -> np.ndarray:
  """The preference model's encoder input (unpadded, int32, at most L tokens).

  Response ids are the response's own tokens, without EOS or padding (strip
  those from sampled sequences first).
  """
  r1 = np.asarray(response_1_ids, np.int32)[:fmt.targets_length - 1]
  r2 = np.asarray(response_2_ids, np.int32)[:fmt.targets_length - 1]
  budget = fmt.inputs_length - fmt.pm_fixed_tokens - len(r1) - len(r2)
  prompt = np.asarray(prompt_ids, np.int32)[max(len(prompt_ids) - budget, 0):]
  return np.concatenate([
      prompt, np.asarray(fmt.response_1_marker, np.int32), r1,
      np.asarray(fmt.response_2_marker, np.int32), r2, np.asarray(fmt.question, np.int32),
      np.asarray([fmt.eos_id], np.int32)])


def pm_target_id(label: float, fmt: PairFormat) -> int:
  """The PM's target token: "1" if response 1 is at least as likely better, else "2"."""
  return fmt.target_1_id if label >= 0.5 else fmt.target_2_id


def _pad(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)  # [examples, length]; 0 = pad
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


class _CachedEncoder:
  """Tokenizes each distinct text once (prompts repeat across pairs)."""

  def __init__(self, vocabulary: seqio.Vocabulary, lengths_only: bool = False):
    self._vocabulary = vocabulary
    self._lengths_only = lengths_only
    self._cache = {}

  def __call__(self, text: str):
    """The int32 ids of ``text``, or with ``lengths_only`` their count (a small cache)."""
    value = self._cache.get(text)
    if value is None:
      ids = self._vocabulary.encode(text)
      value = self._cache[text] = len(ids) if self._lengths_only else np.asarray(ids, np.int32)
    return value


def tokenize_examples(examples: Sequence[schema.PreferenceExample], vocabulary: seqio.Vocabulary,
                      feature_lengths: Mapping[str, int] = PAPER_FEATURE_LENGTHS, *,
                      with_pm_inputs: bool = False) -> dict[str, np.ndarray]:
  """Pair batch arrays for the training loop, without TF graphs.

  Returns ``prompt`` int32 [N, L] (encoder input), ``response_a`` and
  ``response_b`` int32 [N, T] (decoder targets), ``label`` float32 [N]; with
  ``with_pm_inputs`` also ``pm_inputs_ab`` and ``pm_inputs_ba`` int32 [N, L],
  the PM inputs with the responses in the stored and in the swapped order.
  Rows are padded with 0.
  """
  inputs_length, targets_length = _lengths(feature_lengths)
  eos_id = int(vocabulary.eos_id)
  encode = _CachedEncoder(vocabulary)
  prompts = [encode(e.prompt) for e in examples]
  responses_a = [encode(e.response_a) for e in examples]
  responses_b = [encode(e.response_b) for e in examples]
  out = {
      "prompt": _pad([prompt_input_ids(p, inputs_length, eos_id) for p in prompts], inputs_length),
      "response_a": _pad([response_target_ids(r, targets_length, eos_id) for r in responses_a],
                         targets_length),
      "response_b": _pad([response_target_ids(r, targets_length, eos_id) for r in responses_b],
                         targets_length),
      "label": np.asarray([e.label for e in examples], np.float32),
  }
  if with_pm_inputs:
    fmt = pair_format(vocabulary, feature_lengths)
    out["pm_inputs_ab"] = _pad(
        [pair_input_ids(p, a, b, fmt) for p, a, b in zip(prompts, responses_a, responses_b)],
        fmt.inputs_length)
    out["pm_inputs_ba"] = _pad(
        [pair_input_ids(p, b, a, fmt) for p, a, b in zip(prompts, responses_a, responses_b)],
        fmt.inputs_length)
  return out


@dataclasses.dataclass
class TruncationStats:
  """What the truncation rule cut in a set of pairs.

  ``prompts_truncated``: prompts longer than L - 1 tokens (policy inputs);
  ``responses_truncated``: responses (two per pair) longer than T - 1 tokens;
  ``pm_prompts_truncated``: pairs whose prompt was cut in the PM input.
  """
  examples: int = 0
  prompts_truncated: int = 0
  responses_truncated: int = 0
  pm_prompts_truncated: int = 0
  max_prompt_tokens: int = 0
  max_response_tokens: int = 0

  def summary(self) -> str:
    return (f"{self.examples} pairs: {self.prompts_truncated} prompts truncated (left), "
            f"{self.responses_truncated} of {2 * self.examples} responses truncated (right), "
            f"{self.pm_prompts_truncated} PM inputs with the prompt truncated; longest prompt "
            f"{self.max_prompt_tokens} tokens, longest response {self.max_response_tokens}")


def truncation_stats(examples: Iterable[schema.PreferenceExample], vocabulary: seqio.Vocabulary,
                     feature_lengths: Mapping[str, int] = PAPER_FEATURE_LENGTHS) -> TruncationStats:
  """Counts what the truncation rule cuts in ``examples`` (a python-side tokenization pass)."""
  fmt = pair_format(vocabulary, feature_lengths)
  length = _CachedEncoder(vocabulary, lengths_only=True)
  stats = TruncationStats()
  for e in examples:
    prompt, a, b = length(e.prompt), length(e.response_a), length(e.response_b)
    stats.examples += 1
    stats.prompts_truncated += prompt > fmt.inputs_length - 1
    stats.responses_truncated += (a > fmt.targets_length - 1) + (b > fmt.targets_length - 1)
    kept_responses = min(a, fmt.targets_length - 1) + min(b, fmt.targets_length - 1)
    stats.pm_prompts_truncated += prompt > fmt.inputs_length - fmt.pm_fixed_tokens - kept_responses
    stats.max_prompt_tokens = max(stats.max_prompt_tokens, prompt)
    stats.max_response_tokens = max(stats.max_response_tokens, a, b)
  return stats


# ------------------------------------------------------------------ graph path


def _tf_prompt(ids: tf.Tensor, inputs_length: int, eos_id: int) -> tf.Tensor:
  kept = ids[tf.maximum(tf.size(ids) - (inputs_length - 1), 0):]
  return tf.concat([kept, [eos_id]], 0)


def _tf_response(ids: tf.Tensor, targets_length: int, eos_id: int) -> tf.Tensor:
  return tf.concat([ids[:targets_length - 1], [eos_id]], 0)


def _tf_pair(prompt: tf.Tensor, r1: tf.Tensor, r2: tf.Tensor, fmt: PairFormat) -> tf.Tensor:
  r1, r2 = r1[:fmt.targets_length - 1], r2[:fmt.targets_length - 1]
  budget = fmt.inputs_length - fmt.pm_fixed_tokens - tf.size(r1) - tf.size(r2)
  prompt = prompt[tf.maximum(tf.size(prompt) - budget, 0):]
  return tf.concat([prompt, fmt.response_1_marker, r1, fmt.response_2_marker, r2, fmt.question,
                    [fmt.eos_id]], 0)


def _check_sequence_length(sequence_length: Optional[Mapping[str, int]], needed: Mapping[str, int],
                           task: str) -> None:
  # seqio trims features to sequence_length from the right after preprocessing,
  # which would undo the left truncation of prompts: refuse shorter lengths.
  for key, length in needed.items():
    given = (sequence_length or {}).get(key)
    if given is not None and given < length:
      raise ValueError(f"task {task}: sequence_length[{key!r}] = {given} is shorter than the "
                       f"{length} tokens the task was registered with")


def _policy(dataset, sequence_length=None, *, vocabulary, lengths, task):
  _check_sequence_length(sequence_length, dict(zip((INPUTS, TARGETS), lengths)), task)
  eos_id = int(vocabulary.eos_id)

  def fn(ex):
    return {
        INPUTS: _tf_prompt(vocabulary.encode_tf(ex["prompt"]), lengths[0], eos_id),
        TARGETS: _tf_response(vocabulary.encode_tf(ex["response_a"]), lengths[1], eos_id),
        "inputs_pretokenized": ex["prompt"],
        "targets_pretokenized": ex["response_a"],
    }
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _sft(dataset, sequence_length=None, *, vocabulary, lengths, task):
  _check_sequence_length(sequence_length, dict(zip((INPUTS, TARGETS), lengths)), task)
  eos_id = int(vocabulary.eos_id)

  def fn(ex):
    inputs = _tf_prompt(vocabulary.encode_tf(ex["prompt"]), lengths[0], eos_id)
    targets_a = _tf_response(vocabulary.encode_tf(ex["response_a"]), lengths[1], eos_id)
    targets_b = _tf_response(vocabulary.encode_tf(ex["response_b"]), lengths[1], eos_id)
    return tf.data.Dataset.from_tensors({
        INPUTS: inputs, TARGETS: targets_a,
        "inputs_pretokenized": ex["prompt"], "targets_pretokenized": ex["response_a"],
    }).concatenate(tf.data.Dataset.from_tensors({
        INPUTS: inputs, TARGETS: targets_b,
        "inputs_pretokenized": ex["prompt"], "targets_pretokenized": ex["response_b"],
    }))
  return dataset.flat_map(fn)


@seqio.map_over_dataset(num_seeds=1)
def _random_order(ex, seed):
  swap = tf.random.stateless_uniform([], seed=seed) < 0.5
  return {
      **ex,
      "response_a": tf.where(swap, ex["response_b"], ex["response_a"]),
      "response_b": tf.where(swap, ex["response_a"], ex["response_b"]),
      "label": tf.where(swap, 1.0 - ex["label"], ex["label"]),
  }


def _pm(dataset, sequence_length=None, *, vocabulary, fmt, task):
  _check_sequence_length(sequence_length, {INPUTS: fmt.inputs_length, TARGETS: 2}, task)

  def fn(ex):
    inputs = _tf_pair(vocabulary.encode_tf(ex["prompt"]), vocabulary.encode_tf(ex["response_a"]),
                      vocabulary.encode_tf(ex["response_b"]), fmt)
    label = tf.cast(ex["label"], tf.float32)
    answer = tf.where(label >= 0.5, fmt.target_1_id, fmt.target_2_id)
    return {
        INPUTS: inputs,
        TARGETS: tf.stack([answer, fmt.eos_id]),
        "label": label,
        "inputs_pretokenized": tf.strings.join(
            [ex["prompt"], PM_RESPONSE_1_MARKER, ex["response_a"], PM_RESPONSE_2_MARKER,
             ex["response_b"], PM_QUESTION], separator=" "),
    }
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _output_features(vocabulary: seqio.Vocabulary, use: str) -> dict[str, seqio.Feature]:
  features = {INPUTS: seqio.Feature(vocabulary, add_eos=True),
              TARGETS: seqio.Feature(vocabulary, add_eos=True)}
  if use in ("pm", "pm_ordered"):
    features["label"] = seqio.ContinuousFeature(dtype=tf.float32, rank=0)
  return features


def _register(name: str, source: seqio.DataSource, use: str, vocabulary: seqio.Vocabulary,
              feature_lengths: Mapping[str, int]) -> seqio.Task:
  if use not in USES:
    raise ValueError(f"unknown use {use!r}; expected one of {USES}")
  if use in ("pm", "pm_ordered"):
    fmt = pair_format(vocabulary, feature_lengths)
    preprocessors = [functools.partial(_pm, vocabulary=vocabulary, fmt=fmt, task=name)]
    if use == "pm":
      preprocessors.insert(0, _random_order)
  else:
    fn = _policy if use == "policy" else _sft
    preprocessors = [functools.partial(fn, vocabulary=vocabulary, lengths=_lengths(feature_lengths),
                                       task=name)]
  # Registering a name again replaces the task (a new data_dir or vocabulary).
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                output_features=_output_features(vocabulary, use))


def register_tasks(*, dataset: str, data_dir: str, vocabulary: seqio.Vocabulary,
                   feature_lengths: Mapping[str, int] = PAPER_FEATURE_LENGTHS,
                   mini_config=None, uses: Sequence[str] = USES,
                   name_prefix: Optional[str] = None) -> dict[str, str]:
  """Registers the seqio tasks of a prepared dataset; returns {use: task name}.

  Task names are ``f"{name_prefix}_{use}"``, the prefix defaulting to
  ``t5align_{dataset}`` (e.g. ``t5align_tldr_sft``). Splits: 'train' and
  'validation'. ``mini_config`` (a `MiniWorldConfig`) selects the prepared
  miniature world for dataset 'mini'. Registering a name again replaces it.
  """
  prepared = tfds_builders.prepared_dir(dataset, data_dir, mini_config=mini_config)
  if not tf.io.gfile.exists(prepared):
    raise FileNotFoundError(
        f"dataset {dataset!r} is not prepared under {data_dir} (no {prepared}); run "
        f"`t5align data prepare --dataset={dataset} --data_dir={data_dir}` first")
  source = seqio.TfdsDataSource(
      tfds_name=tfds_builders.tfds_name(dataset, mini_config=mini_config), tfds_data_dir=data_dir,
      splits=tfds_builders.SPLITS)
  prefix = name_prefix or f"t5align_{dataset}"
  names = {}
  for use in uses:
    names[use] = f"{prefix}_{use}"
    _register(names[use], source, use, vocabulary, feature_lengths)
  return names


def register_preference_file_task(name: str, path: Union[str, Mapping[str, str]], *, use: str,
                                  vocabulary: seqio.Vocabulary,
                                  feature_lengths: Mapping[str, int] = PAPER_FEATURE_LENGTHS) -> seqio.Task:
  """Registers a file written by `writers.write_examples` (e.g. D_golden) as a seqio task.

  ``path`` is one file (split 'train') or {split: file pattern}.
  """
  split_to_pattern = {"train": path} if isinstance(path, str) else dict(path)
  source = seqio.TFExampleDataSource(split_to_pattern, feature_description=writers.EXAMPLE_FEATURES)
  return _register(name, source, use, vocabulary, feature_lengths)

