"""The main job end to end: `t5align study --quick` runs every stage, then resumes as done.

Also the paper's pooled SFT workflow (App. C): a study run ``--until=relabel``,
one SFT on several D_golden files, then the study on that SFT (``sft_run``).
"""

import contextlib
import io
import json
import os

import gin
import numpy as np
import pytest

from t5align import cli
from t5align import study
from t5align.data import writers
from t5align.eval import evaluate
from t5align.eval import study_report
from t5align.train import fixed_policy
from t5align.train import stages


def _stage_dirs(study_dir):
  return sorted(d for d in os.listdir(study_dir)
                if os.path.isdir(os.path.join(study_dir, d))
                and d not in ("eval", "report", study.COMPILE_CACHE_SUBDIR))


def _main(args):
  """``t5align study`` in this process (the command finalises gin: clear around it)."""
  gin.clear_config(clear_constants=True)
  try:
    return study.main(args)
  finally:
    gin.clear_config(clear_constants=True)


SEED0, SEED1 = "online_lr0.0001_beta0.1_seed0", "online_lr0.0001_beta0.1_seed1"


def _quick(study_dir):
  return ["--gin_file=experiments/mini.gin", "--quick", f"--gin.STUDY_DIR='{study_dir}'"]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
  """One ``--quick`` study, with a compilation cache the determinism test shares."""
  root = tmp_path_factory.mktemp("quick")
  cache = str(root / "jax_cache")
  previous = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      assert _main(_quick(root / "first")) == 0
  finally:
    if previous is None:
      os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    else:
      os.environ["JAX_COMPILATION_CACHE_DIR"] = previous
  return root / "first", out.getvalue(), cache


def _eval_rows(study_dir):
  """Every eval row of a study, without what depends on where and how fast it ran."""
  rows = {}
  for name in sorted(os.listdir(study_dir / "eval")):
    path = study_dir / "eval" / name / "eval.jsonl"
    if path.exists():
      rows[name] = [{k: v for k, v in json.loads(line).items()
                     if k not in ("eval_seconds", "checkpoint")}
                    for line in path.read_text().splitlines()]
  return rows


@pytest.mark.slow
def test_quick_study_runs_every_stage_and_skips_them_on_rerun(quick_study, capsys):
  study_dir, out, _ = quick_study
  stages = _stage_dirs(study_dir)
  # Every experiment of the paper has its run directory, each finished; online,
  # offline and tandem once per training seed.
  for name in ("data", "golden_pm", "relabel", "sft", "proxy_pm", "gates", "golden_policy",
               SEED0, SEED1, "offline_lr0.0001_beta0.1_steps20_seed0",
               "offline_lr0.0001_beta0.1_steps20_seed1", "tandem_lr0.0001_beta0.1_seed0",
               "tandem_lr0.0001_beta0.1_seed1", "sanity_replay", "window_4", "bo2_online",
               "bo2_offline", "bo2_tandem", "pairs_10_vs_10", "pairs_sft_vs_5", "pairs_5_vs_10",
               "fixed_10_vs_10_lr0.0001", "fixed_sft_vs_5_lr0.0001", "fixed_5_vs_10_lr0.0001"):
    assert name in stages, (name, stages)
    assert (study_dir / name / study.DONE).exists(), name
  assert (study_dir / "config.gin").exists()
  assert "policy_init_checkpoint" in (study_dir / "config.gin").read_text()
  assert "gates: measured before any policy run" in out

  # Every policy run is evaluated at each of its checkpoints: 2 per run.
  not_policies = ("data", "golden_pm", "relabel", "sft", "proxy_pm", "gates", "golden_policy")
  policy_runs = [s for s in stages if s not in not_policies and not s.startswith("pairs_")]
  assert len(policy_runs) == 14, policy_runs
  described = json.loads((study_dir / "eval" / study.RUNS_FILE).read_text())
  assert sorted(described) == sorted(policy_runs)
  for run in policy_runs:
    rows = [json.loads(line) for line in
            (study_dir / "eval" / run / "eval.jsonl").read_text().splitlines()]
    last = described[run]["steps"]
    assert sorted(r["step"] for r in rows) == [0, last // 2, last], run
    for row in rows:
      assert row["kl"] >= 0 and 0 <= row["win_rate"] <= 1, (run, row)
      assert 0 <= row["oracle_win_rate"] <= 1 and 0 <= row["golden_oracle_agreement"] <= 1

  # The training seed is its own knob: the two online runs share the world (data,
  # PMs, SFT, golden policy, evaluation prompts) but not their training randomness.
  assert {described[SEED0]["seed"], described[SEED1]["seed"]} == {0, 1}
  rows = _eval_rows(study_dir)
  # The SFT row: same world, same evaluation draws (the online pairs come from each
  # seed's own stream).
  same_world = lambda row: {k: v for k, v in row.items() if "online" not in k}
  assert same_world(rows[SEED0][0]) == same_world(rows[SEED1][0])
  assert rows[SEED0][1:] != rows[SEED1][1:]
  streams = [np.concatenate([b["chosen"] for _, b in writers.read_stream(
      str(study_dir / name / "stream"))]) for name in (SEED0, SEED1)]
  assert not np.array_equal(*streams)

  report_dir = study_dir / "report"
  for name in ("frontier_mini.png", "accuracy_mini.png", "drift_mini.png",
               "fig1_online_offline.png", "fig4_tandem.png", "fig9_best_of_2.png",
               "fig6_online_pairs.png"):
    assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  table = (report_dir / "report.md").read_text()
  for text in (SEED0, "bo2_online", "## Protocol", "## Gates", "## The paper's claims",
               "Offline IPO on the unshuffled D_online reproduces online (App. F)"):
    assert text in table, text
  summary = json.loads((report_dir / "summary.json").read_text())
  sanity = [c for c in summary["claims"] if c["key"] == "sanity_replay"]
  assert sanity == [dict(sanity[0], value=0.0, verdict="reproduced")]

  # A second run finds every stage done and retrains nothing.
  assert _main(_quick(study_dir)) == 0
  again = capsys.readouterr().out
  assert "running in" not in again
  assert again.count("done, skipped") >= len(stages)
  assert out.count("finished in") >= len(stages)


@pytest.mark.slow
def test_two_quick_studies_give_the_same_report(quick_study, tmp_path, monkeypatch, capsys):
  first, _, cache = quick_study
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)  # compiled once, by the first study
  second = tmp_path / "second"
  assert _main(_quick(second)) == 0
  capsys.readouterr()
  assert (first / "report" / "summary.json").read_bytes() == (
      second / "report" / "summary.json").read_bytes()
  assert _eval_rows(first) == _eval_rows(second)


# The quick study cut down further: 64 pairs, 2-step golden and proxy PMs.
TINY = ["--gin_file=experiments/mini.gin", "--quick",
        "--gin.study.StudyConfig.mini_world_train=64",
        "--gin.study.StudyConfig.mini_world_validation=16",
        "--gin.study.StudyConfig.golden_pm_steps=2", "--gin.study.StudyConfig.proxy_pm_steps=2",
        "--gin.study.StudyConfig.pm_warmup_steps=1"]


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory):
  """Phase 1 of the pooled workflow: a task's study ``--until=relabel``, and its output."""
  study_dir = tmp_path_factory.mktemp("pooled") / "task"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert _main([*TINY, "--until=relabel", f"--gin.STUDY_DIR='{study_dir}'"]) == 0
  return study_dir, out.getvalue()


@pytest.mark.slow
def test_until_relabel_stops_after_relabel_with_its_stages_done(relabelled):
  study_dir, out = relabelled
  assert _stage_dirs(study_dir) == ["data", "golden_pm", "relabel"]
  for name in ("data", "golden_pm", "relabel"):
    assert (study_dir / name / study.DONE).exists(), name
  assert os.path.exists(study.d_golden_path(str(study_dir)))
  assert "stopping after relabel" in out and "report:" not in out
  assert not (study_dir / study.SFT_SOURCE_FILE).exists()


def _pooled_sft(run_dir, train_data):
  """Phase 2: ``t5align sft`` on several D_golden files, at the mini policy's size."""
  gin.clear_config(clear_constants=True)
  try:
    cli.run_stage("sft", [
        "--gin_file=runs/sft.gin", "--gin_file=models/mini/policy.gin",
        "--gin_file=partitioning/cpu.gin", "--gin.MODEL=%MINI_POLICY",
        f"--gin.MODEL_DIR='{run_dir}'", f"--gin.TRAIN_DATA={[str(p) for p in train_data]}",
        "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=8", "--gin.stages.FeatureLengths.inputs=32",
        "--gin.stages.FeatureLengths.targets=16"])
  finally:
    gin.clear_config(clear_constants=True)


@pytest.mark.slow
def test_study_on_a_pooled_sft_run_trains_no_sft_and_uses_that_run(relabelled, tmp_path,
                                                                   monkeypatch, capsys):
  study_dir, _ = relabelled
  d_golden = study.d_golden_path(str(study_dir))
  sft_run = str(tmp_path / "pooled_sft")
  # Two files stand for the four tasks' D_golden.
  _pooled_sft(sft_run, [d_golden, study_dir / "relabel" / "d_golden_validation.tfrecord"])
  assert "pooled from 2 files" in capsys.readouterr().out
  args = [*TINY, f"--gin.STUDY_DIR='{study_dir}'", "--gin_file=experiments/with_pooled_sft.gin",
          f"--gin.POOLED_SFT_RUN='{sft_run}'"]

  status = os.path.join(sft_run, "status.json")
  finished = open(status).read()
  with open(status, "w") as f:
    f.write(finished.replace('"completed"', '"running"'))
  with pytest.raises(ValueError, match="the run has not finished"):
    _main(args)
  with open(status, "w") as f:
    f.write(finished)

  # Phase 3, with the proxy PM trained for real and the later stages recorded only.
  proxy_inits, align_sfts, eval_sfts, pairs = [], {}, {}, {}
  real_preference = stages.preference

  def preference(**kwargs):
    proxy_inits.append(kwargs["init_checkpoint"])
    return real_preference(**kwargs)

  def no_sft(**kwargs):
    raise AssertionError(f"the study trained its own SFT: {kwargs}")

  monkeypatch.setattr(stages, "preference", preference)
  monkeypatch.setattr(stages, "sft", no_sft)
  monkeypatch.setattr(stages, "align", lambda **kw: align_sfts.update(
      {os.path.basename(kw["run_dir"]): kw["sft_checkpoint"]}))
  monkeypatch.setattr(fixed_policy, "fixed_policy_pairs", lambda **kw: pairs.update(
      {os.path.basename(os.path.dirname(kw["output_data"])): kw["policy_a"]}))
  monkeypatch.setattr(evaluate, "evaluate_stage", lambda **kw: eval_sfts.update(
      {os.path.basename(kw["output_dir"]): kw["sft_checkpoint"]}))
  monkeypatch.setattr(study_report, "write", lambda **kw: None)
  assert _main(args) == 0
  out = capsys.readouterr().out

  assert "golden_pm: done, skipped" in out and "relabel: done, skipped" in out
  assert f"sft: not trained here; the SFT run {sft_run}" in out
  assert not (study_dir / "sft").exists()
  assert proxy_inits == [sft_run]
  assert (study_dir / "proxy_pm" / "best_checkpoint.json").exists()
  assert len(align_sfts) == 15 and set(align_sfts.values()) == {sft_run}, align_sfts
  assert len(eval_sfts) == 14 and set(eval_sfts.values()) == {sft_run}, eval_sfts
  assert pairs["pairs_sft_vs_5"] == sft_run
  recorded = json.loads((study_dir / study.SFT_SOURCE_FILE).read_text())
  assert recorded == {"sft": os.path.abspath(sft_run)}

  # The same directory without sft_run would build on another SFT: refused.
  with pytest.raises(ValueError, match=study.SFT_SOURCE_FILE):
    _main([*TINY, f"--gin.STUDY_DIR='{study_dir}'"])


def test_until_takes_only_a_stage_a_study_can_stop_after(tmp_path):
  with pytest.raises(ValueError, match="until='eval' .* allowed: data, golden_pm, relabel, sft"):
    study.StudyConfig(study_dir=str(tmp_path), until="eval")
  with pytest.raises(SystemExit, match="--until=sft_stage: unknown stage"):
    study.main(["--until=sft_stage"])
  with pytest.raises(SystemExit, match="--until needs a stage name"):
    study.main(["--gin_file=experiments/mini.gin", "--until"])


def test_sft_run_must_be_a_finished_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="no finished checkpoints in .*nothing/checkpoints"):
    study.check_finished_run(str(tmp_path / "nothing"), what="StudyConfig.sft_run")
