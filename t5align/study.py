"""The study runner: every stage of the paper, in dependency order.

``t5align study --gin_file=gin/experiments/mini.gin [--quick]`` runs, each in
its own directory under ``study_dir``:

  data        D_initial (the miniature world, or files prepared from a public set)
  golden_pm   pairwise PM on D_initial                   (paper §4.1, App. A)
  relabel     D_golden = D_initial relabelled by golden_pm with the decision rule
  sft         SFT on both responses of every D_golden pair (App. C)
  proxy_pm    pairwise PM from the SFT checkpoint on D_golden
  golden_policy  online IPO judged by the golden PM      (§4.1)
  online      online IPO judged by the proxy PM          (§2)
  offline_*   offline IPO on D_golden over the LR x beta sweep (Fig. 1)
  tandem_*    offline IPO on the online stream, shuffled  (Fig. 3-4)
  sanity_replay  offline IPO on the UNshuffled online stream (App. F)
  window_k    the online stream shuffled within windows of k batches (Fig. 13)
  pairs_*, fixed_*  D_4k-vs-4k, D_sft-vs-800, D_800-vs-4k: pairs sampled from
              fixed checkpoints, golden-labelled, then offline IPO (Fig. 5, 12)
  bo2_online, bo2_offline, bo2_tandem  the Best-of-2 loss (§5.4, Fig. 9)
  eval        every checkpoint of every policy run        (§4)
  report      frontier plots and the summary table

A finished stage leaves ``DONE`` in its directory and is skipped on rerun; an
interrupted training stage resumes from its last checkpoint.

``--until=STAGE`` (or ``StudyConfig.until``) stops after one of ``UNTIL_STAGES``;
a later run goes on from there. ``StudyConfig.sft_run`` replaces the ``sft``
stage by an SFT run trained elsewhere. Together they give the paper's pooled
SFT (App. C; docs/launch.md): every task's study ``--until=relabel``, one
``t5align sft`` on the four D_golden files (gin/experiments/pooled_sft.gin),
then every task's study with ``sft_run`` set (gin/experiments/with_pooled_sft.gin).
"""

import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

from t5align.models import t5
from t5align.train import checkpoints
from t5align.train import loop
from t5align.train import stages
from t5align.train import steps

DONE = "DONE"
# Stages a study can stop after (--until), in the order it runs them.
UNTIL_STAGES = ("data", "golden_pm", "relabel", "sft", "proxy_pm", "gates", "golden_policy",
                "online")
# Which SFT policy this study's later stages were built on (its own or an sft_run).
SFT_SOURCE_FILE = "sft_source.json"
# The study's policy runs and what each is (method, seed, grid point): eval/runs.json.
RUNS_FILE = "runs.json"


def d_golden_path(study_dir: str) -> str:
  """The D_golden file (relabelled train split) of the study in ``study_dir``.

  For gin files that read another study's D_golden, e.g. the pooled SFT:
  ``@tldr/study.d_golden_path()`` with ``tldr/study.d_golden_path.study_dir``.
  """
  return os.path.join(study_dir, "relabel", "d_golden.tfrecord")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What one study runs; experiment gin files bind these fields."""
  study_dir: str
  task: str = "mini"
  policy_config: t5.T5Config = t5.T5Config()
  golden_pm_config: t5.T5Config = t5.T5Config()
  proxy_pm_config: t5.T5Config = t5.T5Config()
  vocabulary_path: Optional[str] = None
  feature_lengths: stages.FeatureLengths = stages.FeatureLengths()
  partitioning: stages.Partitioning = stages.Partitioning()
  # D_initial: files of preference examples; the mini task generates them.
  # Public tasks: the tfds data_dir of `t5align data prepare`, or explicit files.
  data_dir: Optional[str] = None
  train_data: Optional[str] = None
  validation_data: Optional[str] = None
  mini_world_train: int = 3000
  mini_world_validation: int = 500
  # Pretrained starting points (paper: T5 v1.1 checkpoints, T5X or Hugging Face
  # format): SFT starts from policy_init_checkpoint, the golden PM from
  # golden_pm_init_checkpoint; None starts from random init. The proxy PM starts
  # from the SFT checkpoint when it has the policy's size.
  policy_init_checkpoint: Optional[str] = None
  golden_pm_init_checkpoint: Optional[str] = None
  # Optimizer of every training stage: 'adafactor' (the paper's) or 'adamw'.
  optimizer_name: str = "adafactor"
  # Preference models.
  pm_batch_size: int = 32
  golden_pm_steps: int = 1000
  proxy_pm_steps: int = 1000
  pm_learning_rate: float = 1e-4
  pm_warmup_steps: int = 1000
  pm_decay: str = "constant"  # after warm-up: constant, linear, cosine or rsqrt
  # SFT.
  sft_batch_size: int = 128
  sft_steps: int = 4000
  sft_learning_rate: float = 3e-5
  # Policy optimisation.
  policy_batch_size: int = 32
  online_steps: int = 4000
  online_learning_rate: float = 1e-5
  online_beta: float = 0.1
  offline_learning_rates: Sequence[float] = (3e-6, 1e-5, 3e-5)
  offline_betas: Sequence[float] = (0.1, 0.5, 1.0)
  offline_steps: Sequence[int] = (4000, 20000)
  tandem: bool = True
  sanity_replay: bool = True
  shuffle_windows: Sequence[int] = (4, 500)
  best_of_2: bool = True
  # Fixed-policy datasets: online checkpoints at early_step (800) and the end (4k).
  fixed_policy_datasets: bool = True
  early_step: int = 800
  fixed_policy_learning_rates: Sequence[float] = (3e-6, 1e-5, 3e-5)
  fixed_policy_beta: float = 0.1
  fixed_policy_steps: int = 20000
  checkpoint_every: int = 200
  # Evaluation.
  num_kl_prompts: int = 256
  num_winrate_prompts: int = 2048
  num_classification_pairs: int = 256
  eval_batch_size: int = 32
  # Bootstrap resamples of the report's intervals (t5align.eval.statistics).
  bootstrap_resamples: int = 1000
  # The world/data seed: the miniature world, the golden and proxy PMs, SFT, the
  # golden policy, and every evaluation subset and draw (so all runs are judged
  # on the same prompts with the same golden-policy samples).
  seed: int = 0
  # Training seeds of the policy runs (parameter-free randomness: data order,
  # online samples, dropout). Online, offline and tandem run once per seed; the
  # variants (Best-of-2, sanity replay, windows, fixed-policy datasets) at the
  # first seed only.
  training_seeds: Sequence[int] = (0,)
  # Online over the offline sweep's LR x beta grid (a symmetric comparison)
  # instead of the single baseline (online_learning_rate, online_beta), which
  # is the paper's protocol. The baseline must be a point of the grid.
  online_sweep: bool = False
  # Checkpoints per policy run (evenly spaced); 0 = every checkpoint_every steps.
  checkpoints_per_run: int = 0
  # Options of the miniature world's MiniWorldConfig beyond seed and sizes.
  mini_world_options: Optional[dict] = None
  # Scaling runs (Fig. 10, 11): reuse data, golden PM, D_golden, proxy PM and golden
  # policy of the Large study in this directory; only SFT and the policies are new.
  base_study_dir: Optional[str] = None
  # An SFT run trained elsewhere (a finished `t5align sft` run directory), used
  # instead of this study's `sft` stage: the start and reference of every policy
  # run, the proxy PM's init (same size) and the KL reference of evaluation. The
  # paper's pooled SFT over all four tasks (App. C): gin/experiments/pooled_sft.gin.
  sft_run: Optional[str] = None
  # Stop after this stage (one of UNTIL_STAGES); None runs every stage.
  until: Optional[str] = None

  def __post_init__(self):
    if not self.training_seeds or len(set(self.training_seeds)) != len(self.training_seeds):
      raise ValueError(f"StudyConfig.training_seeds must be distinct seeds, at least one, got "
                       f"{self.training_seeds!r}")
    if self.online_sweep and (self.online_learning_rate not in self.offline_learning_rates
                              or self.online_beta not in self.offline_betas):
      raise ValueError(f"StudyConfig.online_sweep: the baseline online_learning_rate="
                       f"{self.online_learning_rate:g}, online_beta={self.online_beta:g} must be "
                       f"a point of the offline grid {tuple(self.offline_learning_rates)} x "
                       f"{tuple(self.offline_betas)}")
    if self.until is not None and self.until not in UNTIL_STAGES:
      raise ValueError(f"StudyConfig.until={self.until!r} is not a stage a study can stop after; "
                       f"allowed: {', '.join(UNTIL_STAGES)}")


SHARED_WITH_BASE = ("data", "golden_pm", "relabel", "proxy_pm", "golden_policy")


def _say(message: str) -> None:
  print(f"[study] {message}", flush=True)


class Study:
  """Runs a ``StudyConfig``'s stages, skipping the finished ones."""

  def __init__(self, config: StudyConfig, command: Optional[str] = None):
    self.c = config
    self.command = command  # the command line, for the report's provenance
    os.makedirs(config.study_dir, exist_ok=True)

  def path(self, *parts: str) -> str:
    if self.c.base_study_dir and parts and parts[0] in SHARED_WITH_BASE:
      return os.path.join(self.c.base_study_dir, *parts)
    return os.path.join(self.c.study_dir, *parts)

  def _stage(self, name: str, fn: Callable[[str], None]) -> str:
    run_dir = self.path(name)
    if self.c.base_study_dir and name in SHARED_WITH_BASE:
      if not os.path.exists(os.path.join(run_dir, DONE)):
        raise FileNotFoundError(f"{name}: base study stage {run_dir} is not finished; run the "
                                "base (Large) study first")
      _say(f"{name}: taken from the base study {self.c.base_study_dir}")
      return run_dir
    if os.path.exists(os.path.join(run_dir, DONE)):
      _say(f"{name}: done, skipped")
      return run_dir
    os.makedirs(run_dir, exist_ok=True)
    _say(f"{name}: running in {run_dir}")
    start = time.time()
    fn(run_dir)
    with open(os.path.join(run_dir, DONE), "w") as f:
      f.write(json.dumps({"seconds": round(time.time() - start, 1)}) + "\n")
    _say(f"{name}: finished in {time.time() - start:.0f}s")
    return run_dir

  def _stop_after(self, name: str) -> bool:
    if self.c.until != name:
      return False
    _say(f"stopping after {name} (until={name!r}); run again without it to go on")
    return True

  def _common(self) -> dict:
    return {"vocabulary_path": self.c.vocabulary_path, "feature_lengths": self.c.feature_lengths}

  def _ckpt(self) -> stages.Checkpointing:
    return stages.Checkpointing(every_steps=self.c.checkpoint_every, keep=10 ** 6)

  def data(self) -> tuple[str, str]:
    c = self.c
    if c.task != "mini":
      if c.train_data and c.validation_data:
        return c.train_data, c.validation_data
      if not c.data_dir:
        raise ValueError(f"task {c.task!r}: set StudyConfig.data_dir to the tfds data directory "
                         "of `t5align data prepare` (docs/data.md), or train_data and "
                         "validation_data to preference-example files")

      def export(run_dir):
        from t5align.data import tfds_builders, writers
        for split in ("train", "validation"):
          writers.write_examples(os.path.join(run_dir, f"{split}.tfrecord"),
                                 tfds_builders.load_examples(c.task, split, data_dir=c.data_dir))
      run_dir = self._stage("data", export)
      return os.path.join(run_dir, "train.tfrecord"), os.path.join(run_dir, "validation.tfrecord")

    def make(run_dir):
      from t5align.data import mini_world, writers
      world = mini_world.MiniWorld(mini_world.MiniWorldConfig(
          seed=c.seed, num_train=c.mini_world_train, num_validation=c.mini_world_validation,
          **(c.mini_world_options or {})))
      writers.write_examples(os.path.join(run_dir, "train.tfrecord"), world.d_initial("train"))
      writers.write_examples(os.path.join(run_dir, "validation.tfrecord"),
                             world.d_initial("validation"))
    run_dir = self._stage("data", make)
    return os.path.join(run_dir, "train.tfrecord"), os.path.join(run_dir, "validation.tfrecord")

  def run(self) -> None:
    c = self.c
    train, validation = self.data()
    if self._stop_after("data"):
      return
    pm_optimizer = stages.Optimizer(name=c.optimizer_name, learning_rate=c.pm_learning_rate,
                                    warmup_steps=c.pm_warmup_steps, decay=c.pm_decay)
    golden_pm = self._stage("golden_pm", lambda d: stages.preference(
        run_dir=d, model_config=c.golden_pm_config, train_data=train, validation_data=validation,
        batch_size=c.pm_batch_size, train_steps=c.golden_pm_steps, optimizer=pm_optimizer,
        checkpointing=self._ckpt(), partitioning_config=c.partitioning,
        init_checkpoint=c.golden_pm_init_checkpoint, seed=c.seed, **self._common()))
    if self._stop_after("golden_pm"):
      return
    d_golden = self.path("relabel", "d_golden.tfrecord")
    d_golden_val = self.path("relabel", "d_golden_validation.tfrecord")

    def relabel(d):
      for source, target in ((train, d_golden), (validation, d_golden_val)):
        stages.relabel(pm_run=golden_pm, pm_config=c.golden_pm_config, input_data=source,
                       output_data=target, source_name="golden_pm",
                       batch_size=c.eval_batch_size, partitioning_config=c.partitioning,
                       **self._common())
    self._stage("relabel", relabel)
    if self._stop_after("relabel"):
      return
    sft = self.sft(d_golden)
    if self._stop_after("sft"):
      return
    proxy_pm = self._stage("proxy_pm", lambda d: stages.preference(
        run_dir=d, model_config=c.proxy_pm_config, train_data=d_golden,
        validation_data=d_golden_val, batch_size=c.pm_batch_size, train_steps=c.proxy_pm_steps,
        optimizer=pm_optimizer, checkpointing=self._ckpt(), partitioning_config=c.partitioning,
        init_checkpoint=sft if c.proxy_pm_config == c.policy_config else None, seed=c.seed,
        **self._common()))
    if self._stop_after("proxy_pm"):
      return
    self._stage("gates", lambda d: self.gates(d, sft=sft, golden_pm=golden_pm,
                                              proxy_pm=proxy_pm, d_golden=d_golden,
                                              d_golden_val=d_golden_val, validation=validation))
    if self._stop_after("gates"):
      return
    self.policy_runs(sft=sft, golden_pm=golden_pm, proxy_pm=proxy_pm, d_golden=d_golden)

  def _policy_ckpt(self, train_steps: int) -> stages.Checkpointing:
    if not self.c.checkpoints_per_run:
      return self._ckpt()
    return stages.Checkpointing(every_steps=max(1, train_steps // self.c.checkpoints_per_run),
                                keep=10 ** 6)

  def policy_runs(self, *, sft: str, golden_pm: str, proxy_pm: str, d_golden: str) -> None:
    """Every policy run of the study, then their evaluation and the report.

    ``self.runs`` maps each run's name to its description (method, training
    seed, learning rate, beta, steps, and the online stream its evaluation
    classifies); the report reads it from ``eval/runs.json``.
    """
    c = self.c
    self.runs, policies = {}, {}
    first_seed = c.training_seeds[0]

    def align(name, *, method, seed, stream_seed=None, **kwargs):
      lr = kwargs.pop("learning_rate", c.online_learning_rate)
      loss = kwargs.pop("loss", steps.AlignLoss(name="ipo", beta=c.online_beta))
      train_steps = kwargs["train_steps"]
      self.runs[name] = {"method": method, "seed": seed, "learning_rate": lr,
                         "beta": loss.beta if loss.name != "best_of_2" else None,
                         "loss": loss.name, "steps": train_steps,
                         "stream_seed": first_seed if stream_seed is None else stream_seed}
      policies[name] = self._stage(name, lambda d: stages.align(
          run_dir=d, policy_config=c.policy_config, sft_checkpoint=sft,
          batch_size=c.policy_batch_size, loss=loss,
          optimizer=stages.Optimizer(name=c.optimizer_name, learning_rate=lr),
          checkpointing=self._policy_ckpt(train_steps),
          partitioning_config=c.partitioning, seed=seed, **self._common(), **kwargs))
      return policies[name]

    self.golden_policy = self._stage("golden_policy", lambda d: stages.align(
        run_dir=d, policy_config=c.policy_config, sft_checkpoint=sft,
        batch_size=c.policy_batch_size, loss=steps.AlignLoss(name="ipo", beta=c.online_beta),
        optimizer=stages.Optimizer(name=c.optimizer_name, learning_rate=c.online_learning_rate),
        checkpointing=self._policy_ckpt(c.online_steps), partitioning_config=c.partitioning,
        seed=c.seed, pair_source="online", train_data=d_golden, pm_run=golden_pm,
        pm_config=c.golden_pm_config, train_steps=c.online_steps, **self._common()))
    if self._stop_after("golden_policy"):
      return
    grid = [(lr, beta) for lr in c.offline_learning_rates for beta in c.offline_betas]
    online_grid = grid if c.online_sweep else [(c.online_learning_rate, c.online_beta)]
    for seed in c.training_seeds:
      for lr, beta in online_grid:
        align(online_run(lr, beta, seed), method="online", seed=seed, stream_seed=seed,
              pair_source="online", train_data=d_golden, pm_run=proxy_pm,
              pm_config=c.proxy_pm_config, train_steps=c.online_steps, learning_rate=lr,
              loss=steps.AlignLoss(name="ipo", beta=beta))
    if self._stop_after("online"):
      return
    for seed in c.training_seeds:
      stream = self.path(self.baseline_online(seed), "stream")
      for lr, beta in grid:
        for n in c.offline_steps:
          align(f"offline_lr{lr:g}_beta{beta:g}_steps{n}_seed{seed}", method="offline",
                seed=seed, stream_seed=seed, pair_source="offline", train_data=d_golden,
                learning_rate=lr, train_steps=n, loss=steps.AlignLoss(name="ipo", beta=beta))
        if c.tandem:
          align(f"tandem_lr{lr:g}_beta{beta:g}_seed{seed}", method="tandem", seed=seed,
                stream_seed=seed, pair_source="replay", replay_stream=stream,
                replay_order="shuffled", learning_rate=lr, train_steps=c.online_steps,
                loss=steps.AlignLoss(name="ipo", beta=beta))
    stream = self.path(self.baseline_online(first_seed), "stream")
    if c.sanity_replay:
      align("sanity_replay", method="sanity_replay", seed=first_seed, pair_source="replay",
            replay_stream=stream, replay_order="ordered", train_steps=c.online_steps)
    for window in c.shuffle_windows:
      align(f"window_{window}", method=f"window_{window}", seed=first_seed, pair_source="replay",
            replay_stream=stream, replay_order="windowed", replay_window=window,
            train_steps=c.online_steps)
    if c.best_of_2:
      bo2 = steps.AlignLoss(name="best_of_2")
      align("bo2_online", method="bo2_online", seed=first_seed, pair_source="online",
            train_data=d_golden, pm_run=proxy_pm, pm_config=c.proxy_pm_config,
            train_steps=c.online_steps, loss=bo2)
      align("bo2_offline", method="bo2_offline", seed=first_seed, pair_source="offline",
            train_data=d_golden, train_steps=c.online_steps, loss=bo2)
      if c.tandem:
        align("bo2_tandem", method="bo2_tandem", seed=first_seed, pair_source="replay",
              replay_stream=self.path("bo2_online", "stream"), replay_order="shuffled",
              train_steps=c.online_steps, loss=bo2)
    if c.fixed_policy_datasets:
      self.fixed_policy_runs(align, sft=sft, golden_pm=golden_pm, d_golden=d_golden)
    self.evaluate(policies, sft=sft, golden_pm=golden_pm, d_golden=d_golden)

  def baseline_online(self, seed: int) -> str:
    """The name of the online run at the baseline (online_learning_rate, online_beta)."""
    return online_run(self.c.online_learning_rate, self.c.online_beta, seed)

  def sft(self, d_golden: str) -> str:
    """The SFT run of this study: its own ``sft`` stage on D_golden, or ``sft_run``."""
    c = self.c
    if not c.sft_run:
      self._check_sft_source("sft stage")
      return self._stage("sft", lambda d: stages.sft(
          run_dir=d, model_config=c.policy_config, train_data=d_golden,
          batch_size=c.sft_batch_size, train_steps=c.sft_steps,
          optimizer=stages.Optimizer(name=c.optimizer_name, learning_rate=c.sft_learning_rate),
          checkpointing=self._ckpt(), partitioning_config=c.partitioning,
          init_checkpoint=c.policy_init_checkpoint, seed=c.seed,
          **self._common()))
    check_finished_run(c.sft_run, what="StudyConfig.sft_run")
    self._check_sft_source(os.path.abspath(c.sft_run))
    _say(f"sft: not trained here; the SFT run {c.sft_run} (StudyConfig.sft_run) is the start "
         "and reference of every policy, the proxy PM's init and the KL reference")
    return c.sft_run

  def _check_sft_source(self, source: str) -> None:
    """Refuses to go on, on another SFT, from stages an earlier run built on one.

    ``source`` is the sft_run's absolute path or "sft stage"; the first run past
    relabel records it in ``sft_source.json``.
    """
    record = os.path.join(self.c.study_dir, SFT_SOURCE_FILE)
    if os.path.exists(record):
      with open(record) as f:
        recorded = json.load(f)["sft"]
    elif os.path.exists(os.path.join(self.c.study_dir, "sft")):
      recorded = "sft stage"  # a study from before sft_source.json existed
    else:
      recorded = None
    if recorded is not None and recorded != source:
      raise ValueError(f"{self.c.study_dir}: its stages after relabel were run on the SFT "
                       f"{recorded!r} ({record}) but StudyConfig.sft_run now gives {source!r}; "
                       "use a new study_dir, or delete the stages after relabel")
    if recorded is None:
      with open(record, "w") as f:
        f.write(json.dumps({"sft": source}) + "\n")

  def fixed_policy_runs(self, align, *, sft: str, golden_pm: str, d_golden: str) -> None:
    """D_4k-vs-4k, D_sft-vs-800 and D_800-vs-4k (Fig. 5, 12), then offline IPO on each.

    The fixed policies are checkpoints of the baseline online run of the first
    training seed; the offline runs on them use that seed too.
    """
    from t5align.train import fixed_policy
    c = self.c
    seed = c.training_seeds[0]
    online, final = self.path(self.baseline_online(seed)), c.online_steps
    every = self._policy_ckpt(final).every_steps
    if c.early_step % every or c.early_step >= final:
      raise ValueError(f"early_step={c.early_step} must be a multiple of the online run's "
                       f"checkpoint interval {every} and below online_steps={final}")
    sides = {f"{final}_vs_{final}": ((online, final), (online, final)),
             f"sft_vs_{c.early_step}": ((sft, None), (online, c.early_step)),
             f"{c.early_step}_vs_{final}": ((online, c.early_step), (online, final))}
    for name, ((a, step_a), (b, step_b)) in sides.items():
      data = self.path(f"pairs_{name}", "pairs.tfrecord")
      self._stage(f"pairs_{name}", lambda d, a=a, b=b, step_a=step_a, step_b=step_b, data=data:
                  fixed_policy.fixed_policy_pairs(
                      policy_a=a, policy_b=b, step_a=step_a, step_b=step_b,
                      model_config=c.policy_config, golden_pm_run=golden_pm,
                      golden_pm_config=c.golden_pm_config, prompts_data=d_golden,
                      output_data=data, batch_size=c.eval_batch_size, seed=c.seed,
                      partitioning_config=c.partitioning, **self._common()))
      for lr in c.fixed_policy_learning_rates:
        align(f"fixed_{name}_lr{lr:g}", method=f"fixed_{name}", seed=seed, pair_source="offline",
              train_data=data, learning_rate=lr, train_steps=c.fixed_policy_steps,
              loss=steps.AlignLoss(name="ipo", beta=c.fixed_policy_beta))

  def gates(self, run_dir: str, *, sft: str, golden_pm: str, proxy_pm: str, d_golden: str,
            d_golden_val: str, validation: str) -> None:
    """The protocol's gates, measured before any policy stage (``t5align.eval.gates``)."""
    from t5align.eval import gates as gates_lib
    c = self.c
    gates_lib.gates_stage(
        output_dir=run_dir, task=c.task, policy_config=c.policy_config, sft_run=sft,
        golden_pm_run=golden_pm, golden_pm_config=c.golden_pm_config, proxy_pm_run=proxy_pm,
        proxy_pm_config=c.proxy_pm_config, d_golden=d_golden, d_initial_validation=validation,
        sft_epochs=self.sft_epochs(d_golden), num_prompts=c.num_kl_prompts,
        batch_size=c.eval_batch_size, seed=c.seed, partitioning_config=c.partitioning,
        **self._common())

  def sft_epochs(self, d_golden: str) -> Optional[float]:
    """Passes of this study's SFT over its targets (None for an sft_run trained elsewhere)."""
    if self.c.sft_run:
      return None
    from t5align.data import writers
    targets = 2 * len(writers.read_examples(d_golden))
    return self.c.sft_steps * self.c.sft_batch_size / targets

  def evaluate(self, policies: dict, *, sft: str, golden_pm: str, d_golden: str) -> None:
    from t5align.eval import evaluate as evaluate_lib
    from t5align.eval import study_report
    c = self.c
    eval_dir = self.path("eval")
    os.makedirs(eval_dir, exist_ok=True)
    for name, run_dir in policies.items():
      stream = self.path(self.baseline_online(self.runs[name]["stream_seed"]), "stream")
      self._stage(os.path.join("eval", name), lambda d, run_dir=run_dir, stream=stream:
                  evaluate_lib.evaluate_stage(
          run_dir=run_dir, output_dir=d, policy_config=c.policy_config, sft_checkpoint=sft,
          golden_policy_checkpoint=self.golden_policy, golden_pm_run=golden_pm,
          golden_pm_config=c.golden_pm_config, d_golden=d_golden, online_stream=stream,
          num_kl_prompts=c.num_kl_prompts, num_winrate_prompts=c.num_winrate_prompts,
          num_classification_pairs=c.num_classification_pairs, batch_size=c.eval_batch_size,
          seed=c.seed, partitioning_config=c.partitioning, save_samples=True,
          oracle=c.task == "mini", **self._common()))
    stages.write_json_atomic(os.path.join(eval_dir, RUNS_FILE), self.runs)
    study_report.write(eval_dir=eval_dir, output_dir=self.path("report"), task=c.task,
                       gates_dir=self.path("gates"), study_config=c,
                       num_resamples=c.bootstrap_resamples, command=self.command)


def online_run(learning_rate: float, beta: float, seed: int) -> str:
  """The run name of online IPO at one grid point and training seed."""
  return f"online_lr{learning_rate:g}_beta{beta:g}_seed{seed}"


def check_finished_run(run_dir: str, *, what: str) -> str:
  """``run_dir`` if it is a completed training run with checkpoints; a clear error if not."""
  ckpt_dir = os.path.join(run_dir, stages.CHECKPOINT_SUBDIR)
  if not (os.path.isdir(ckpt_dir) and checkpoints.list_steps(ckpt_dir)):
    raise FileNotFoundError(f"{what}={run_dir!r}: no finished checkpoints in {ckpt_dir}; train "
                            "that run first (docs/launch.md, 'Pooled SFT')")
  status_path = os.path.join(run_dir, loop.STATUS_FILE)
  status = None
  if os.path.exists(status_path):
    with open(status_path) as f:
      status = json.load(f)
  if not status or status.get("status") != "completed":
    raise ValueError(f"{what}={run_dir!r}: the run has not finished ({status_path}: {status}); "
                     "run its command again to complete it")
  return run_dir


COMPILE_CACHE_SUBDIR = "compile_cache"


def use_compilation_cache(study_dir: str) -> str:
  """Turns on JAX's persistent compilation cache for this process; returns its directory.

  The study's ~30 runs jit the same step functions at the same shapes, so
  every program is compiled once per study (and once per machine when
  ``JAX_COMPILATION_CACHE_DIR`` points several studies at one directory);
  default ``<study_dir>/compile_cache``. A cached executable is the one the
  compiler produced, so results are unchanged.
  """
  from jax.experimental.compilation_cache import compilation_cache
  import jax
  cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      study_dir, COMPILE_CACHE_SUBDIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # a cache opened earlier in this process is left
  compilation_cache.set_cache_dir(cache_dir)
  return cache_dir


def _pop_until(argv: list[str]) -> tuple[Optional[str], list[str]]:
  """``--until=STAGE`` or ``--until STAGE`` taken out of ``argv``."""
  until, rest = None, []
  args = iter(argv)
  for arg in args:
    if arg == "--until":
      until = next(args, None)
      if until is None:
        raise SystemExit(f"--until needs a stage name: {', '.join(UNTIL_STAGES)}")
    elif arg.startswith("--until="):
      until = arg[len("--until="):]
    else:
      rest.append(arg)
  if until is not None and until not in UNTIL_STAGES:
    raise SystemExit(f"--until={until}: unknown stage; a study can stop after "
                     f"{', '.join(UNTIL_STAGES)}")
  return until, rest


def main(argv: Sequence[str]) -> int:
  """``t5align study --gin_file=EXPERIMENT.gin [--quick] [--until=STAGE] [--gin.X=V ...]``."""
  import gin
  from t5align import cli
  argv_given = list(argv)
  until, argv = _pop_until(list(argv))
  quick = "--quick" in argv
  argv = [a for a in argv if a != "--quick"]
  files, bindings, search, rest = cli.split_gin_args(argv)
  if rest:
    raise SystemExit(f"t5align study: unexpected arguments {rest}")
  if not files:
    files = ["experiments/mini.gin"]
  if quick:
    files = files + ["experiments/mini_quick.gin"]
  cli.parse_gin(files, bindings, search)
  config = gin.get_configurable(StudyConfig)()
  if until is not None:
    config = dataclasses.replace(config, until=until)
  os.makedirs(config.study_dir, exist_ok=True)
  stages.write_text_atomic(os.path.join(config.study_dir, "config.gin"), gin.config_str())
  use_compilation_cache(config.study_dir)
  Study(config, command=" ".join(["t5align study", *argv_given])).run()
  if config.until is None:
    _say(f"report: {os.path.join(config.study_dir, 'report')}")
  return 0
