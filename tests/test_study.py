"""The main job end to end: `t5align study --quick` runs every stage, then resumes as done."""

import json
import os

import gin
import pytest

from t5align import study

pytestmark = pytest.mark.slow


def _stage_dirs(study_dir):
  return sorted(d for d in os.listdir(study_dir)
                if os.path.isdir(os.path.join(study_dir, d)) and d not in ("eval", "report"))


def _main(args):
  """``t5align study`` in this process (the command finalises gin: clear around it)."""
  gin.clear_config(clear_constants=True)
  try:
    return study.main(args)
  finally:
    gin.clear_config(clear_constants=True)


def test_quick_study_runs_every_stage_and_skips_them_on_rerun(tmp_path, capsys):
  study_dir = tmp_path / "quick"
  args = ["--gin_file=experiments/mini.gin", "--quick", f"--gin.STUDY_DIR='{study_dir}'"]
  assert _main(args) == 0
  out = capsys.readouterr().out

  stages = _stage_dirs(study_dir)
  # Every experiment of the paper has its run directory, each finished.
  for name in ("data", "golden_pm", "relabel", "sft", "proxy_pm", "golden_policy", "online",
               "offline_lr0.0001_beta0.1_steps10", "tandem_lr0.0001_beta0.1", "sanity_replay",
               "window_4", "bo2_online", "bo2_offline", "bo2_tandem", "pairs_10_vs_10",
               "pairs_sft_vs_5", "pairs_5_vs_10", "fixed_10_vs_10_lr0.0001",
               "fixed_sft_vs_5_lr0.0001", "fixed_5_vs_10_lr0.0001"):
    assert name in stages, (name, stages)
    assert (study_dir / name / study.DONE).exists(), name
  assert (study_dir / "config.gin").exists()
  assert "policy_init_checkpoint" in (study_dir / "config.gin").read_text()

  # Every policy run is evaluated at each of its checkpoints (0, 5, 10).
  not_policies = ("data", "golden_pm", "relabel", "sft", "proxy_pm", "golden_policy")
  policy_runs = [s for s in stages if s not in not_policies and not s.startswith("pairs_")]
  assert len(policy_runs) == 11, policy_runs
  for run in policy_runs:
    rows = [json.loads(line) for line in
            (study_dir / "eval" / run / "eval.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == [0, 5, 10], run
    for row in rows:
      assert row["kl"] >= 0 and 0 <= row["win_rate"] <= 1, (run, row)

  report = study_dir / "report"
  for name in ("frontier_mini.png", "accuracy_mini.png", "drift_mini.png"):
    assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  table = (report / "report.md").read_text()
  for run in ("online", "offline_lr0.0001_beta0.1_steps10", "bo2_online"):
    assert run in table

  # A second run finds every stage done and retrains nothing.
  assert _main(args) == 0
  again = capsys.readouterr().out
  assert "running in" not in again
  assert again.count("done, skipped") >= len(stages)
  assert out.count("finished in") >= len(stages)
