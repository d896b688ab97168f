"""The study's stages: plain functions with keyword-only arguments, bound by gin.

``sft``, ``preference`` and ``align`` train on the one loop
(``t5align.train.loop.train``) with sharded, jitted steps from
``t5align.train.steps``; ``relabel`` and ``sample`` run a trained model over a
dataset. Every stage writes into its own run directory, and a training stage
restarted on its directory resumes where it stopped.

Datasets are files of preference examples (``t5align.data.writers``); models
start from random parameters, from a t5align checkpoint directory, or from an
imported Hugging Face / T5X checkpoint (``init_checkpoint``).
"""

import dataclasses
import functools
import json
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from t5align import partitioning
from t5align.data import schema
from t5align.data import tasks
from t5align.data import vocab as vocab_lib
from t5align.data import writers
from t5align.models import preference as preference_model
from t5align.models import t5
from t5align.train import checkpoints
from t5align.train import loop
from t5align.train import metrics as metrics_lib
from t5align.train import optimizers
from t5align.train import pair_sources
from t5align.train import state as state_lib
from t5align.train import steps

CHECKPOINT_SUBDIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Partitioning:
  """Mesh shape and logical-axis rule set (see ``t5align.partitioning``)."""
  rules: str = "data_parallel"
  data: int = -1
  model: int = 1

  def placement(self) -> partitioning.Placement:
    return partitioning.Placement.create(rules=self.rules, data=self.data, model=self.model)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Arguments of ``optimizers.make_optimizer``."""
  name: str = "adafactor"
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  decay: str = "constant"
  weight_decay: float = 0.0
  grad_accum_steps: int = 1

  def build(self, total_steps: int):
    return optimizers.make_optimizer(
        name=self.name, learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
        decay=self.decay, total_steps=total_steps, weight_decay=self.weight_decay,
        grad_accum_steps=self.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class Checkpointing:
  every_steps: int = 200
  keep: int = 3


@dataclasses.dataclass(frozen=True)
class FeatureLengths:
  """Token lengths: policy inputs (prompts), targets (responses) and PM inputs.

  ``pm_inputs`` is the length of a preference model's serialised pair (prompt,
  two responses, markers); 0 means ``inputs``. A PM input holds at most the
  policy's prompt (``inputs``), so ``pm_inputs`` above ``inputs + 2 *
  targets + markers`` buys nothing, and below it the prompt is cut from the
  left for long responses. Short prompts with a longer PM input (the
  miniature study: 32 / 72) keep the policy's encoder from attending over
  padding.
  """
  inputs: int = 1024
  targets: int = 128
  pm_inputs: int = 0

  def __post_init__(self):
    if self.pm_inputs < 0:
      raise ValueError(f"FeatureLengths.pm_inputs must be >= 0 (0: same as inputs), "
                       f"got {self.pm_inputs}")

  @property
  def pm_input_length(self) -> int:
    return self.pm_inputs or self.inputs

  def as_dict(self) -> dict:
    """Lengths of the policy's examples (prompt, response)."""
    return {tasks.INPUTS: self.inputs, tasks.TARGETS: self.targets}

  def pm_dict(self) -> dict:
    """Lengths of the PM's examples (serialised pair, response)."""
    return {tasks.INPUTS: self.pm_input_length, tasks.TARGETS: self.targets}


def _say(message: str) -> None:
  print(f"[t5align] {message}", flush=True)


def load_params(path: str, config: t5.T5Config):
  """Parameters from a t5align run/checkpoint directory, or an imported HF / T5X checkpoint."""
  path = os.path.abspath(path)
  candidates = [path, os.path.join(path, CHECKPOINT_SUBDIR)]
  for candidate in candidates:
    if os.path.isdir(candidate) and (checkpoints.list_steps(candidate)
                                     or os.path.isdir(os.path.join(candidate, checkpoints.STATE))):
      params = checkpoints.load_params(candidate)
      break
  else:
    from t5align.models import load as load_lib  # HF / T5X readers
    loaded_config, params = load_lib.load_pretrained(path)
    for field in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                  "num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets",
                  "relative_attention_max_distance"):
      if getattr(loaded_config, field) != getattr(config, field):
        raise ValueError(f"checkpoint {path} has {field}={getattr(loaded_config, field)} but the "
                         f"configured model has {field}={getattr(config, field)}")
  return checked_params(params, config, where=f"checkpoint {path}")


def checked_params(params, config: t5.T5Config, *, where: str):
  """``params`` as float32 numpy arrays, after checking every shape against ``config``."""
  problems = []
  jax.tree_util.tree_map_with_path(
      lambda p, w, g: problems.append(jax.tree_util.keystr(p))
      if tuple(w.shape) != tuple(np.shape(g)) else None, t5.abstract_params(config), params)
  if problems:
    raise ValueError(f"{where}: parameter shapes differ from the configured model at "
                     f"{problems[:5]}")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


class _Runtime:
  """The placement and the sharded train state of one training stage."""

  def __init__(self, config: t5.T5Config, part: Partitioning, batch_size: int):
    self.config = config
    self.placement = part.placement()
    self.mesh, self.rules = self.placement.mesh, self.placement.rules
    self.placement.check_batch_size(batch_size)
    self.param_shardings = self.placement.param_shardings(config)

  def place_params(self, params, config: Optional[t5.T5Config] = None):
    """Parameters of ``config`` (default: this runtime's model) placed in their shards."""
    return self.placement.params(params, config or self.config)

  def context(self):
    """Mesh and logical-axis rules, for jitted functions called outside ``jit_step``."""
    return self.placement.context()

  def state_shardings(self, abstract_state):
    """Shardings of a train state: optimizer slots follow their parameter.

    A leaf shaped like a parameter and stored under its path (the params, Adam
    moments, unfactored Adafactor slots, accumulated gradients) takes that
    parameter's sharding; the rest (counters, RNG, factored Adafactor vectors)
    is replicated. Left to XLA, every optimizer slot would be replicated:
    ``tx.init`` builds them from constants, so no sharding propagates to them.
    """
    owners = {tuple(path): (a.shape, s) for (path, a), s in zip(
        jax.tree_util.tree_flatten_with_path(t5.abstract_params(self.config))[0],
        jax.tree.leaves(self.param_shardings))}
    depths = sorted({len(path) for path in owners}, reverse=True)

    def pick(path, leaf):
      for depth in depths:
        shape, sharding = owners.get(tuple(path[-depth:]), (None, None))
        if shape == leaf.shape:
          return sharding
      return partitioning.replicated(self.mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_state)

  def state_fns(self, params_fn, tx, seed: int):
    """(init_state, abstract_state, state shardings); see ``state_shardings``."""

    def create(params):
      return state_lib.TrainState.create(params=params, tx=tx, rng=jax.random.key(seed))

    abstract = jax.eval_shape(create, t5.abstract_params(self.config))
    shardings = self.state_shardings(abstract)
    create_jit = partitioning.jit_sharded(create, mesh=self.mesh, rules=self.rules,
                                          in_shardings=(self.param_shardings,),
                                          out_shardings=shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return (lambda: create_jit(self.place_params(params_fn()))), abstract, shardings

  def jit_step(self, step_fn, state_shardings):
    return partitioning.jit_sharded(step_fn, mesh=self.mesh, rules=self.rules,
                                    in_shardings=(state_shardings, None),
                                    out_shardings=(state_shardings, None), donate_argnums=(0,))


class _ShardedSource:
  """Moves a source's global numpy batches onto the mesh (rows over 'data').

  Every process computes the same global batch (sources are deterministic in
  seed and step) and feeds only its own block of rows, so the global batch is
  the configured batch size whatever the number of processes.
  """

  def __init__(self, source, placement: partitioning.Placement):
    self.source, self.placement = source, placement

  def next_batch(self, state):
    return self.placement.rows(self.source.next_batch(state))

  def get_state(self):
    return self.source.get_state()

  def set_state(self, data_state):
    self.source.set_state(data_state)

  def on_restore(self, step):
    self.source.on_restore(step)


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``path`` through a temporary file and a rename: never a partial file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _run(*, run_dir: str, config: t5.T5Config, part: Partitioning, batch_size: int,
         train_steps: int, optimizer: Optimizer, ckpt: Checkpointing, seed: int, params_fn,
         make_step, source, runtime: Optional[_Runtime] = None) -> Any:
  """Shared plumbing of the training stages: mesh, state, loop, checkpoints, metrics."""
  os.makedirs(run_dir, exist_ok=True)
  runtime = runtime or _Runtime(config, part, batch_size)
  tx = optimizer.build(train_steps)
  init_state, abstract_state, shardings = runtime.state_fns(params_fn, tx, seed)
  step_fn = runtime.jit_step(make_step(tx), shardings)
  checkpointer = checkpoints.Checkpointer(os.path.join(run_dir, CHECKPOINT_SUBDIR), keep=ckpt.keep,
                                          save_interval_steps=ckpt.every_steps)
  writer = metrics_lib.MetricsWriter(run_dir)
  try:
    return loop.train(run_dir=run_dir, total_steps=train_steps, init_state=init_state,
                      abstract_state=abstract_state, step_fn=step_fn,
                      data=_ShardedSource(source, runtime.placement), checkpointer=checkpointer,
                      metrics=writer)
  finally:
    checkpointer.close()
    writer.close()


def _params_fn(config: t5.T5Config, init_checkpoint: Optional[str], seed: int):
  if init_checkpoint:
    return lambda: load_params(init_checkpoint, config)
  return lambda: t5.init_params(config, jax.random.key(seed))


def _tokenized(path: str, vocabulary, lengths: FeatureLengths) -> dict:
  """Token arrays of a pair file: its exact-token side file if present, else re-tokenised text."""
  side = writers.tokens_path(path)
  if os.path.exists(side):
    with np.load(side) as arrays:
      out = {k: arrays[k] for k in ("prompt", "response_a", "response_b", "label")}
    for key, width in (("prompt", lengths.inputs), ("response_a", lengths.targets),
                       ("response_b", lengths.targets)):
      if out[key].shape[1] > width:
        raise ValueError(f"{side}: field {key!r} has width {out[key].shape[1]}, more than the "
                         f"configured length {width}")
    return out
  examples = writers.read_examples(path)
  if not examples:
    raise ValueError(f"{path}: the dataset is empty")
  return tasks.tokenize_examples(examples, vocabulary, lengths.as_dict())


def _pad_columns(x: np.ndarray, width: int) -> np.ndarray:
  """``x`` [rows, w] padded with 0 (the pad id) to [rows, width]."""
  return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def sft_pool(train_data: Union[str, Sequence[str]], vocabulary, lengths: FeatureLengths) -> dict:
  """The SFT set of one pair file or a list of them: every pair's prompt twice, once per response.

  The pairs of all files are concatenated in the order given, then
  ``inputs`` = [prompts; prompts] and ``targets`` = [responses a; responses
  b], so one file gives exactly its own layout. Side files may be narrower
  than the configured lengths; columns are padded to the widest file.
  """
  paths = [train_data] if isinstance(train_data, (str, os.PathLike)) else list(train_data)
  if not paths:
    raise ValueError(f"sft: train_data must be one path or a non-empty list of paths, "
                     f"got {train_data!r}")
  parts = []
  for i, path in enumerate(paths):
    where = f"sft: train_data file {i + 1} of {len(paths)}, {path}"
    if not os.path.exists(path):
      raise FileNotFoundError(f"{where}: no such file")
    arrays = _tokenized(path, vocabulary, lengths)
    if not len(arrays["prompt"]):
      raise ValueError(f"{where}: the dataset is empty")
    _say(f"sft: {2 * len(arrays['prompt'])} targets ({len(arrays['prompt'])} pairs) from {path}")
    parts.append(arrays)

  def column(key):
    width = max(p[key].shape[1] for p in parts)
    return np.concatenate([_pad_columns(p[key], width) for p in parts])

  prompt = column("prompt")
  pool = {"inputs": np.concatenate([prompt, prompt]),
          "targets": np.concatenate([column("response_a"), column("response_b")])}
  if len(paths) > 1:
    _say(f"sft: {len(pool['inputs'])} targets pooled from {len(paths)} files")
  return pool


def sft(*, run_dir: str, model_config: t5.T5Config, train_data: Union[str, Sequence[str]],
        batch_size: int, train_steps: int, vocabulary_path: Optional[str] = None,
        feature_lengths: FeatureLengths = FeatureLengths(),
        optimizer: Optimizer = Optimizer(learning_rate=3e-5),
        checkpointing: Checkpointing = Checkpointing(),
        partitioning_config: Partitioning = Partitioning(), init_checkpoint: Optional[str] = None,
        z_loss: float = 1e-4, seed: int = 0):
  """Supervised fine-tuning on BOTH responses of every pair (the paper's SFT set).

  ``train_data`` is one pair file or a list of them. The paper trains one SFT
  policy on a set pooled over the D_golden of all four tasks (App. C;
  gin/experiments/pooled_sft.gin); ``sft_pool`` builds it.
  """
  data = sft_pool(train_data, vocab_lib.get_vocabulary(vocabulary_path), feature_lengths)
  return _run(run_dir=run_dir, config=model_config, part=partitioning_config,
              batch_size=batch_size, train_steps=train_steps, optimizer=optimizer,
              ckpt=checkpointing, seed=seed,
              params_fn=_params_fn(model_config, init_checkpoint, seed),
              make_step=lambda tx: steps.make_sft_step(model_config, tx, z_loss=z_loss),
              source=pair_sources.EpochBatches(data, batch_size=batch_size, seed=seed))


def pair_format(vocabulary, lengths: FeatureLengths) -> preference_model.PairFormat:
  return tasks.pair_format(vocabulary, lengths.pm_dict()).for_model()


def _ordered(arrays: dict) -> dict:
  return pair_sources.order_pairs(arrays["prompt"], arrays["response_a"], arrays["response_b"],
                                  arrays["label"])


def preference_accuracy(params, config: t5.T5Config, fmt: preference_model.PairFormat, pairs: dict, *,
                        pm_input_length: int, batch_size: int,
                        placement: partitioning.Placement) -> float:
  """Decision-rule accuracy of a PM (placed by ``placement``) on (chosen, rejected, label) pairs."""
  margins = preference_margins(params, config, fmt, pairs["prompt"], pairs["chosen"],
                               pairs["rejected"], pm_input_length=pm_input_length,
                               batch_size=batch_size, placement=placement)
  predicted = np.asarray(preference_model.decide(jnp.asarray(margins)))
  return float(np.mean(np.asarray(preference_model.agreement(predicted, pairs["label"]))))


@functools.partial(jax.jit, static_argnames=("config", "fmt", "pm_input_length"))
def _margins(params, prompt, response_1, response_2, *, config, fmt, pm_input_length):
  return preference_model.symmetric_preference(params, config, fmt, prompt, response_1, response_2,
                                               pm_input_length)["margin"]


def preference_margins(params, config, fmt, prompt, response_1, response_2, *, pm_input_length,
                       batch_size, placement: partitioning.Placement) -> np.ndarray:
  """Decision-rule margins r(x,y1,y2) - r(x,y2,y1) for every row, in fixed-shape batches.

  ``params`` are the PM's, placed with ``placement.params``; rows are fed over
  the placement's 'data' axis (``batch_size`` must divide over it).
  """
  fn = functools.partial(_margins, config=config, fmt=fmt, pm_input_length=pm_input_length)
  (margins,) = placement.map_batches(lambda _, *rows: fn(params, *rows),
                                     [prompt, response_1, response_2], batch_size)
  return margins


def preference(*, run_dir: str, model_config: t5.T5Config, train_data: str, batch_size: int,
               train_steps: int, validation_data: Optional[str] = None,
               vocabulary_path: Optional[str] = None,
               feature_lengths: FeatureLengths = FeatureLengths(),
               optimizer: Optimizer = Optimizer(learning_rate=1e-4, warmup_steps=1000),
               checkpointing: Checkpointing = Checkpointing(),
               partitioning_config: Partitioning = Partitioning(),
               init_checkpoint: Optional[str] = None, seed: int = 0):
  """Pairwise preference model (golden or proxy) with random order swapping.

  After training, every checkpoint is scored on the validation set with the
  decision rule and ``best_checkpoint.json`` names the most accurate one (the
  paper stops at the validation plateau).
  """
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  fmt = pair_format(vocabulary, feature_lengths)
  pairs = _ordered(_tokenized(train_data, vocabulary, feature_lengths))
  _say(f"preference: {len(pairs['prompt'])} pairs from {train_data}")
  source = pair_sources.EpochBatches({k: pairs[k] for k in ("prompt", "chosen", "rejected", "label")},
                    batch_size=batch_size, seed=seed)
  runtime = _Runtime(model_config, partitioning_config, batch_size)
  state = _run(run_dir=run_dir, config=model_config, part=partitioning_config,
               batch_size=batch_size, train_steps=train_steps, optimizer=optimizer,
               ckpt=checkpointing, seed=seed,
               params_fn=_params_fn(model_config, init_checkpoint, seed),
               make_step=lambda tx: steps.make_preference_step(
                   model_config, tx, fmt, max_input_length=feature_lengths.pm_input_length),
               source=source, runtime=runtime)
  if validation_data:
    val = _ordered(_tokenized(validation_data, vocabulary, feature_lengths))
    ckpt_dir = os.path.join(run_dir, CHECKPOINT_SUBDIR)
    placement = runtime.placement  # the training mesh scores the checkpoints
    scores = {}
    for step in checkpoints.list_steps(ckpt_dir):
      params = placement.params(checkpoints.load_params(ckpt_dir, step), model_config)
      scores[step] = preference_accuracy(params, model_config, fmt, val,
                                         pm_input_length=feature_lengths.pm_input_length,
                                         batch_size=batch_size, placement=placement)
      _say(f"preference: step {step} validation accuracy {scores[step]:.4f}")
    best = max(scores, key=lambda s: (scores[s], s))
    write_json_atomic(os.path.join(run_dir, "best_checkpoint.json"),
                       {"step": best, "validation_accuracy": scores[best],
                        "all": {str(k): v for k, v in scores.items()}})
  return state


def best_checkpoint_params(run_dir: str, config: t5.T5Config):
  """A PM run's best-validation checkpoint (or its latest without validation)."""
  best = os.path.join(run_dir, "best_checkpoint.json")
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_SUBDIR)
  if os.path.exists(best):
    with open(best) as f:
      return checkpoints.load_params(ckpt_dir, json.load(f)["step"])
  return load_params(run_dir, config)


def relabel(*, pm_run: str, pm_config: t5.T5Config, input_data: str, output_data: str,
            source_name: str, batch_size: int = 32, vocabulary_path: Optional[str] = None,
            feature_lengths: FeatureLengths = FeatureLengths(),
            partitioning_config: Partitioning = Partitioning()) -> dict:
  """Relabels every pair with a PM and the decision rule (e.g. D_initial -> D_golden).

  The PM is placed on the mesh of ``partitioning_config`` (e.g. fsdp for a
  golden PM larger than one device) and pairs are scored ``batch_size`` at a
  time over its 'data' axis.
  """
  if os.path.exists(output_data):
    _say(f"relabel: {output_data} exists; nothing to do")
    return {"skipped": True}
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  fmt = pair_format(vocabulary, feature_lengths)
  placement = partitioning_config.placement()
  placement.check_batch_size(batch_size)
  examples = writers.read_examples(input_data)
  arrays = tasks.tokenize_examples(examples, vocabulary, feature_lengths.as_dict())
  params = placement.params(best_checkpoint_params(pm_run, pm_config), pm_config)
  margins = preference_margins(params, pm_config, fmt, arrays["prompt"], arrays["response_a"],
                               arrays["response_b"], pm_input_length=feature_lengths.pm_input_length,
                               batch_size=batch_size, placement=placement)
  labels = np.asarray(preference_model.decide(jnp.asarray(margins)))
  relabelled = [dataclasses.replace(e, label=float(l), source=source_name)
                for e, l in zip(examples, labels)]
  writers.write_examples(output_data, relabelled)
  agreement = float(np.mean(np.asarray(preference_model.agreement(
      jnp.asarray(labels), jnp.asarray([e.label for e in examples])))))
  summary = {"pairs": len(examples), "agreement_with_input_labels": agreement,
             "ties": int(np.sum(labels == 0.5)), "output": output_data}
  _say(f"relabel: {summary}")
  return summary


def unique_prompt_examples(path: str) -> list[schema.PreferenceExample]:
  """The first example of every distinct prompt of ``path``, in first-seen order."""
  first = {}
  for example in writers.read_examples(path):
    first.setdefault(example.prompt, example)
  if not first:
    raise ValueError(f"{path}: the prompts dataset is empty")
  return list(first.values())


def _prompts(examples, vocabulary, lengths: FeatureLengths) -> np.ndarray:
  """Tokenised prompts of ``examples`` (encoder inputs)."""
  return tasks.tokenize_examples(examples, vocabulary, lengths.as_dict())["prompt"]


def align(*, run_dir: str, policy_config: t5.T5Config, sft_checkpoint: str, batch_size: int,
          train_steps: int, pair_source: str = "offline",
          loss: steps.AlignLoss = steps.AlignLoss(), train_data: Optional[str] = None,
          pm_run: Optional[str] = None, pm_config: Optional[t5.T5Config] = None,
          replay_stream: Optional[str] = None, replay_order: str = "shuffled",
          replay_window: int = 1, temperature: float = 1.0,
          vocabulary_path: Optional[str] = None,
          feature_lengths: FeatureLengths = FeatureLengths(),
          optimizer: Optimizer = Optimizer(learning_rate=1e-5),
          checkpointing: Checkpointing = Checkpointing(),
          partitioning_config: Partitioning = Partitioning(), seed: int = 0):
  """IPO / DPO / SLiC / Best-of-2 from the SFT policy with one pair source.

  pair_source:
    'offline': pairs of ``train_data`` (D_golden or any relabelled set);
      reference log-probs computed once and cached in ``run_dir``.
    'online': two samples per prompt of ``train_data`` from the current
      policy, ordered by the PM of ``pm_run`` (proxy, or golden for the golden
      policy); recorded to ``run_dir/stream``.
    'replay': a recorded online stream (``replay_stream``), in the given order.
  Whatever the source, the update is ``steps.make_align_step`` with ``loss``.
  """
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  sft_params = load_params(sft_checkpoint, policy_config)
  runtime = _Runtime(policy_config, partitioning_config, batch_size)
  ref_params = runtime.place_params(sft_params)
  if pair_source == "offline":
    if not train_data:
      raise ValueError("align: pair_source='offline' needs train_data")
    pairs = _ordered(_tokenized(train_data, vocabulary, feature_lengths))
    pairs = pair_sources.reference_logprobs(ref_params, policy_config, pairs,
                                            reduction=loss.reduction, batch_size=batch_size,
                                            cache_dir=os.path.join(run_dir, "ref_cache"),
                                            progress=_say)
    source = pair_sources.OfflinePairs(pairs, batch_size=batch_size, seed=seed)
  elif pair_source == "online":
    if not (train_data and pm_run and pm_config):
      raise ValueError("align: pair_source='online' needs train_data (prompts), pm_run, pm_config")
    settings = pair_sources.OnlineSettings(
        policy_config=policy_config, pm_config=pm_config, pair_format=pair_format(vocabulary, feature_lengths),
        pm_input_length=feature_lengths.pm_input_length, max_decode_length=feature_lengths.targets,
        temperature=temperature, reduction=loss.reduction)
    prompts = _prompts(unique_prompt_examples(train_data), vocabulary, feature_lengths)
    pm_params = runtime.place_params(best_checkpoint_params(pm_run, pm_config), pm_config)
    source = pair_sources.OnlinePairs(prompts, settings=settings, ref_params=ref_params,
                                      pm_params=pm_params, batch_size=batch_size, seed=seed,
                                      recorder=writers.StreamWriter(os.path.join(run_dir, "stream")),
                                      context=runtime.context)
  elif pair_source == "replay":
    if not replay_stream:
      raise ValueError("align: pair_source='replay' needs replay_stream")
    batches = [batch for _, batch in writers.read_stream(replay_stream)]
    source = pair_sources.ReplayPairs(batches, order=replay_order, seed=seed,
                                      window=replay_window)
    if train_steps > len(source):
      raise ValueError(f"align: train_steps={train_steps} exceeds the {len(source)} recorded "
                       f"batches of {replay_stream}")
  else:
    raise ValueError(f"align: unknown pair_source {pair_source!r}; allowed: 'offline', 'online', "
                     "'replay'")
  _say(f"align: {loss.name} (beta={loss.beta}, reduction={loss.reduction}) on {pair_source} pairs")
  return _run(run_dir=run_dir, config=policy_config, part=partitioning_config,
              batch_size=batch_size, train_steps=train_steps, optimizer=optimizer,
              ckpt=checkpointing, seed=seed, params_fn=lambda: sft_params,
              make_step=lambda tx: steps.make_align_step(policy_config, tx, loss), source=source,
              runtime=runtime)


def sample(*, checkpoint: str, model_config: t5.T5Config, prompts_data: str, output_data: str,
           num_samples: int = 1, batch_size: int = 32, temperature: float = 1.0,
           vocabulary_path: Optional[str] = None,
           feature_lengths: FeatureLengths = FeatureLengths(),
           partitioning_config: Partitioning = Partitioning(), seed: int = 0) -> int:
  """Writes ``num_samples`` responses per prompt of ``prompts_data`` as JSON lines.

  The policy is placed on the mesh of ``partitioning_config``; ``batch_size``
  prompts (a multiple of its 'data' axis) are sampled per call, the batch
  starting at prompt ``i`` with ``fold_in(key(seed), i)``.
  """
  from t5align import sampling  # pylint: disable=g-import-not-at-top
  vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
  placement = partitioning_config.placement()
  placement.check_batch_size(batch_size)
  params = placement.params(load_params(checkpoint, model_config), model_config)
  unique = unique_prompt_examples(prompts_data)
  prompts = _prompts(unique, vocabulary, feature_lengths)
  texts = [e.prompt for e in unique]

  def draw(b, x):
    out = sampling.sample(params, x, config=model_config,
                          rng=jax.random.fold_in(jax.random.key(seed), b * batch_size),
                          num_samples=num_samples, max_decode_length=feature_lengths.targets,
                          temperature=temperature)
    return out.tokens.reshape(batch_size, num_samples, -1)  # rows are grouped per prompt

  (tokens,) = placement.map_batches(draw, [prompts], batch_size)
  rows = []
  for i, prompt_tokens in enumerate(tokens):
    for j, sample_tokens in enumerate(prompt_tokens):
      ids = [int(t) for t in sample_tokens if t not in (0, 1)]
      rows.append({"prompt": texts[i], "sample": j, "response": vocabulary.decode(ids),
                   "tokens": ids})
  tmp = f"{output_data}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, output_data)
  _say(f"sample: {len(rows)} responses -> {output_data}")
  return len(rows)


STAGES = {"sft": sft, "preference": preference, "align": align, "relabel": relabel,
          "sample": sample}
