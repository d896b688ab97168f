"""Every experiment config parses and binds the paper's settings (spec §1-2, §7)."""

import dataclasses

import gin
import pytest

from t5align import cli
from t5align import study
from t5align.models import load
from t5align.models import mini_base
from t5align.models import t5
from t5align.train import stages

TASKS = ["tldr", "hh_helpful", "hh_harmless", "chat_arena"]
MACROS = ["DATA_DIR = '/data/tfds'", "VOCABULARY = '/data/sentencepiece.model'"]


def _config(files, bindings=()):
  gin.clear_config(clear_constants=True)
  try:
    cli.parse_gin(files, list(bindings))
    return gin.get_configurable(study.StudyConfig)()
  finally:
    gin.clear_config(clear_constants=True)


def _sft_bindings(files, bindings=()):
  """What a `t5align sft` command with these gin files passes to ``stages.sft``."""
  gin.clear_config(clear_constants=True)
  try:
    cli.parse_gin(files, list(bindings))
    return gin.get_bindings(stages.sft)
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.parametrize("task", TASKS)
def test_paper_task_binds_the_paper_hyperparameters(task):
  c = _config([f"experiments/{task}.gin"], MACROS)
  assert c.task == task and c.study_dir == f"runs/{task}" and c.data_dir == "/data/tfds"
  assert c.policy_config.emb_dim == t5.T5_1_1_SIZES["large"].emb_dim
  assert c.proxy_pm_config.emb_dim == t5.T5_1_1_SIZES["large"].emb_dim
  assert c.golden_pm_config.emb_dim == t5.T5_1_1_SIZES["xxl"].emb_dim
  assert (c.feature_lengths.inputs, c.feature_lengths.targets) == (1024, 128)
  assert (c.sft_batch_size, c.sft_learning_rate, c.sft_steps) == (128, 3e-5, 4000)
  assert (c.policy_batch_size, c.online_learning_rate, c.online_beta) == (32, 1e-5, 0.1)
  assert c.online_steps == (2000 if task == "hh_harmless" else 4000)
  assert tuple(c.offline_learning_rates) == (3e-6, 1e-5, 3e-5)
  assert tuple(c.offline_betas) == (0.1, 0.5, 1.0)
  assert tuple(c.offline_steps) == (4000, 20000)
  assert c.tandem and c.sanity_replay and c.best_of_2 and c.fixed_policy_datasets
  assert c.early_step == 800 and c.fixed_policy_steps == 20000
  assert (c.num_kl_prompts, c.num_winrate_prompts, c.num_classification_pairs) == (256, 2048, 256)
  assert (c.pm_batch_size, c.pm_learning_rate, c.pm_warmup_steps) == (16, 1e-4, 1000)


@pytest.mark.parametrize("scale,size,batch", [("xl", "xl", 16), ("xxl", "xxl", 8)])
def test_scaling_reuses_the_large_study(scale, size, batch):
  c = _config(["experiments/tldr.gin", f"experiments/scale_{scale}.gin"], MACROS)
  assert c.base_study_dir == "runs/tldr" and c.study_dir == f"runs/scale_{scale}"
  assert c.policy_config.emb_dim == t5.T5_1_1_SIZES[size].emb_dim
  assert c.proxy_pm_config.emb_dim == t5.T5_1_1_SIZES["large"].emb_dim
  assert (c.policy_batch_size, c.sft_batch_size, c.sft_learning_rate) == (batch, batch, 1e-5)
  assert c.num_kl_prompts == 32


def test_mini_and_quick():
  full = _config(["experiments/mini.gin"])
  quick = _config(["experiments/mini.gin", "experiments/mini_quick.gin"])
  assert full.task == quick.task == "mini"
  assert quick.online_steps < full.online_steps and quick.study_dir != full.study_dir
  for c in (full, quick):
    every = c.online_steps // c.checkpoints_per_run
    assert c.early_step % every == 0 and c.early_step < c.online_steps
  # The main job's protocol (docs/results/README.md): fitted SFT, three training
  # seeds, online and offline on one grid, offline over several epochs, at least 8
  # checkpoints per run, KL on 256 prompts.
  assert 2.5 <= full.sft_steps * full.sft_batch_size / (2 * full.mini_world_train) <= 4
  assert len(full.training_seeds) >= 3 and full.online_sweep
  assert full.offline_steps[-1] * full.policy_batch_size >= 2 * full.mini_world_train
  assert full.checkpoints_per_run >= 8 and full.num_kl_prompts == 256
  assert len(quick.training_seeds) >= 2


@pytest.mark.parametrize("size,field,init", [("small", "policy_config", "policy_init_checkpoint"),
                                             ("large", "golden_pm_config",
                                              "golden_pm_init_checkpoint")])
def test_mini_study_starts_from_the_shipped_bases(size, field, init):
  c = _config(["experiments/mini.gin"])
  assert getattr(c, init) == mini_base.checkpoint_path(size)
  shipped, _ = load.load_pretrained(mini_base.checkpoint_path(size))
  want = getattr(c, field)
  for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
               "num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets",
               "relative_attention_max_distance"):
    assert getattr(shipped, name) == getattr(want, name) == getattr(mini_base.SIZES[size], name)


def test_pooled_sft_is_the_studies_sft_on_the_four_d_golden(tmp_path, monkeypatch):
  """experiments/pooled_sft.gin: the paper's one SFT over all four tasks (App. C)."""
  # Run where a study has written runs/ (importable as a namespace package):
  # gin's package-resource lookup of an `include 'runs/...'` would crash here.
  (tmp_path / "runs").mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  sft = _sft_bindings(["experiments/pooled_sft.gin"], MACROS[1:])
  assert sft["train_data"] == [study.d_golden_path(f"runs/{task}") for task in TASKS]
  assert sft["run_dir"] == "runs/pooled_sft" and sft["init_checkpoint"] is None
  assert (sft["batch_size"], sft["train_steps"]) == (128, 4000)
  assert sft["optimizer"].learning_rate == 3e-5
  assert (sft["feature_lengths"].inputs, sft["feature_lengths"].targets) == (1024, 128)
  assert sft["vocabulary_path"] == "/data/sentencepiece.model"
  # A drop-in for a study's own sft stage: the same model, optimizer and mesh.
  c = _config(["experiments/tldr.gin"], MACROS)
  assert sft["model_config"] == c.policy_config
  assert sft["optimizer"] == stages.Optimizer(name=c.optimizer_name,
                                              learning_rate=c.sft_learning_rate)
  assert sft["partitioning_config"] == c.partitioning
  moved = _sft_bindings(["experiments/pooled_sft.gin"],
                        [*MACROS[1:], "HH_HARMLESS_STUDY_DIR = '/shared/hh_harmless'"])
  assert moved["train_data"][2] == "/shared/hh_harmless/relabel/d_golden.tfrecord"
  with pytest.raises(ValueError, match="VOCABULARY"):
    _sft_bindings(["experiments/pooled_sft.gin"])


@pytest.mark.parametrize("task", TASKS)
def test_with_pooled_sft_points_a_task_study_at_the_pooled_run(task):
  alone = _config([f"experiments/{task}.gin"], MACROS)
  pooled = _config([f"experiments/{task}.gin", "experiments/with_pooled_sft.gin"], MACROS)
  assert alone.sft_run is None and pooled.sft_run == "runs/pooled_sft"
  assert pooled == dataclasses.replace(alone, sft_run="runs/pooled_sft")
