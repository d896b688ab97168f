"""The command line: gin files and bindings, config.gin, errors before any work."""

import os

import gin
import pytest

from t5align import cli
from t5align.data import mini_world
from t5align.data import writers
from t5align.train import checkpoints

TINY = """
from __gin__ import dynamic_registration
from t5align.models import t5
MODEL = @tiny_test/t5.T5Config()
tiny_test/t5.T5Config:
  vocab_size = 320
  emb_dim = 16
  num_heads = 2
  head_dim = 8
  mlp_dim = 16
  num_encoder_layers = 1
  num_decoder_layers = 1
  dtype = 'float32'
"""


@pytest.fixture
def setup(tmp_path):
  (tmp_path / "tiny.gin").write_text(TINY)
  data = tmp_path / "train.tfrecord"
  world = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=16, num_validation=4))
  writers.write_examples(str(data), world.d_initial("train"))
  yield tmp_path, data
  gin.clear_config(clear_constants=True)


def _args(tmp_path, data, run_dir, *extra):
  return ["sft", "--gin_file=runs/sft.gin", f"--gin_file={tmp_path / 'tiny.gin'}",
          f"--gin.MODEL_DIR='{run_dir}'", f"--gin.TRAIN_DATA='{data}'", "--gin.TRAIN_STEPS=2",
          "--gin.BATCH_SIZE=4", "--gin.stages.FeatureLengths.inputs=48",
          "--gin.stages.FeatureLengths.targets=16", "--gin.stages.Partitioning.data=1", *extra]


def test_sft_from_the_command_line_writes_config_and_checkpoints(setup):
  tmp_path, data = setup
  run_dir = tmp_path / "sft"
  assert cli.main(_args(tmp_path, data, run_dir)) == 0
  config = (run_dir / "config.gin").read_text()
  assert "train_steps = %TRAIN_STEPS" in config and "TRAIN_STEPS = 2" in config
  assert checkpoints.list_steps(run_dir / "checkpoints") == [2]


def test_misspelt_binding_fails_before_any_work(setup):
  tmp_path, data = setup
  run_dir = tmp_path / "typo"
  with pytest.raises(ValueError, match="batchsize"):
    cli.main(_args(tmp_path, data, run_dir, "--gin.stages.sft.batchsize=4"))
  assert not os.path.exists(run_dir)


def test_split_gin_args():
  files, bindings, search, rest = cli.split_gin_args(
      ["--gin_file=a.gin", "--gin_file", "b.gin", "--gin.X=3", "--gin_search_paths=p,q", "--quick"])
  assert files == ["a.gin", "b.gin"] and bindings == ["X = 3"] and search == ["p", "q"]
  assert rest == ["--quick"]
  with pytest.raises(SystemExit):
    cli.split_gin_args(["--gin.X"])


def test_unknown_command_is_refused():
  with pytest.raises(SystemExit, match="unknown command"):
    cli.main(["trian"])
