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


def fails_with_one_line(capsys, argv):
  """Runs the CLI, which must fail with exit code 1 and one line on stderr; returns that line."""
  gin.clear_config()  # one process runs several commands here
  capsys.readouterr()
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith(f"t5align {argv[0]}: error: ")
  return err.strip()


@pytest.mark.parametrize("binding, says", [
    ("--gin.stages.sft.batchsize=4", "--gin.stages.sft.batchsize=4: ValueError: Configurable "
     "'stages.sft' doesn't have a parameter named 'batchsize'. (did you mean batch_size?)"),
    ("--gin.stages.sfft.batch_size=4", "No configurable matching 'stages.sfft'. (did you mean "
     "stages.sft"),
    ("--gin.TRAIN_STEP=3", "--gin.TRAIN_STEP=3: no gin file uses the macro TRAIN_STEP, so it would "
     "be ignored (did you mean TRAIN_STEPS"),
    ("--gin.BATCH_SIZE=[4", "--gin.BATCH_SIZE=[4: unclosed bracket or quote"),
    ("--gin.BATCH_SIZE='4", "--gin.BATCH_SIZE='4: SyntaxError: Unable to parse value."),
])
def test_misspelt_or_malformed_binding_fails_before_any_work(setup, capsys, binding, says):
  tmp_path, data = setup
  run_dir = tmp_path / "typo"
  assert says in fails_with_one_line(capsys, _args(tmp_path, data, run_dir, binding))
  assert not os.path.exists(run_dir)


def test_missing_input_and_unset_macro_fail_before_any_work(setup, capsys):
  tmp_path, data = setup
  run_dir = tmp_path / "bad"
  args = _args(tmp_path, data, run_dir)
  missing = [a if not a.startswith("--gin.TRAIN_DATA") else f"--gin.TRAIN_DATA='{tmp_path}/no.rec'"
             for a in args]
  assert (f"TRAIN_DATA (stages.sft.train_data) = '{tmp_path}/no.rec': no such file or directory"
          in fails_with_one_line(capsys, missing))
  unset = [a for a in args if not a.startswith("--gin.TRAIN_DATA")]
  assert "macro TRAIN_DATA is used but not set: add --gin.TRAIN_DATA=" in fails_with_one_line(
      capsys, unset)
  assert "--gin_file=nowhere.gin: not found" in fails_with_one_line(
      capsys, [*args, "--gin_file=nowhere.gin"])
  assert not os.path.exists(run_dir)


def test_debug_shows_the_traceback(setup, monkeypatch):
  tmp_path, data = setup
  args = _args(tmp_path, data, tmp_path / "debug", "--gin.TRAIN_STEP=3")
  with pytest.raises(cli.UsageError, match="TRAIN_STEP"):
    cli.main([*args, "--debug"])
  gin.clear_config(clear_constants=True)
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(cli.UsageError, match="TRAIN_STEP"):
    cli.main(args)


def test_checkpoint_interval_and_keep_from_the_command_line(setup):
  tmp_path, data = setup
  run_dir = tmp_path / "every"
  args = [a for a in _args(tmp_path, data, run_dir) if not a.startswith("--gin.TRAIN_STEPS")]
  assert cli.main([*args, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_EVERY=1",
                   "--gin.CHECKPOINTS_KEPT=2"]) == 0
  assert checkpoints.list_steps(run_dir / "checkpoints") == [2, 3]


@pytest.mark.parametrize("run", ["align", "preference", "sft"])
def test_run_files_document_the_checkpoint_macros(run):
  with open(os.path.join(cli.REPO_GIN_DIR, "runs", f"{run}.gin")) as f:
    text = f.read()
  header = text.split("from __gin__")[0]
  for macro in ("CHECKPOINT_EVERY", "CHECKPOINTS_KEPT"):
    assert macro in header and f"%{macro}" in text


def test_eval_of_a_directory_without_checkpoints_is_an_error(setup, capsys):
  tmp_path, _ = setup
  empty = tmp_path / "empty_run"
  (empty / "checkpoints").mkdir(parents=True)
  for name in ("sft", "golden", "pm"):
    (tmp_path / name).mkdir()
  argv = ["eval", "--gin_file=runs/eval.gin", f"--gin_file={tmp_path / 'tiny.gin'}",
          f"--gin.RUN_DIR='{empty}'", f"--gin.OUTPUT_DIR='{tmp_path / 'eval'}'",
          f"--gin.SFT_CHECKPOINT='{tmp_path / 'sft'}'", f"--gin.GOLDEN_POLICY='{tmp_path / 'golden'}'",
          f"--gin.GOLDEN_PM_RUN='{tmp_path / 'pm'}'", "--gin.GOLDEN_PM_MODEL=%MODEL",
          f"--gin.D_GOLDEN='{tmp_path / 'train.tfrecord'}'"]
  line = fails_with_one_line(capsys, argv)
  assert f"RUN_DIR (evaluate.evaluate_stage.run_dir) = '{empty}': no finalized checkpoint" in line
  assert not os.path.exists(tmp_path / "eval")


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
