"""Tests of t5align.eval.report on small hand-made rows."""

import json
import math

import matplotlib.image
import numpy as np
import pytest

from t5align.eval import report


def row(step, kl, win_rate, accuracy=None, drift=None, **extra):
  out = {"step": step, "checkpoint": f"ckpt/{step}", "kl": kl,
         "log_kl": math.log(kl) if kl > 0 else None, "win_rate": win_rate}
  if accuracy is not None:
    out["accuracy_d_golden"] = accuracy
  if drift is not None:
    out["drift_winner"], out["drift_loser"] = drift, 2 * drift
  out.update(extra)
  return out


SFT_ROW = {"step": 0, "checkpoint": "sft", "kl": 0.0, "log_kl": None, "win_rate": 0.25}


def synthetic_runs(tmp_path):
  """Online win rates 0.1 .. 1.0 over two runs; offline 0.2 and 0.4; one tandem run."""
  online_a = [SFT_ROW] + [row(100 * (i + 1), 0.5 * (i + 1), w, accuracy=0.4, drift=-1.0 * i)
                          for i, w in enumerate([0.1, 0.6, 0.3, 0.5, 0.2])]
  online_b = [row(100 * (i + 1), 1.0 + i, w, accuracy=0.45, accuracy_online=0.7)
              for i, w in enumerate([0.9, 1.0, 0.4, 0.8, 0.7])]
  # Out of step order on purpose; one errored row that must be ignored.
  offline = [row(400, 3.0, 0.4, accuracy=0.65), row(200, 1.5, 0.2, accuracy=0.6),
             {"step": 300, "error": "ValueError: bad"}]
  tandem_path = tmp_path / "tandem.jsonl"
  tandem_path.write_text("".join(json.dumps(r) + "\n" for r in
                                 [row(200, 2.0, 0.35, accuracy=0.55), row(400, 4.0, 0.3)]))
  return [("tldr", "online", "online_a", online_a), ("tldr", "online", "online_b", online_b),
          ("tldr", "offline", "offline_lr3e-6", offline),
          ("tldr", "tandem", "tandem_1", str(tandem_path)),
          ("hh helpful", "offline", "only_offline", [row(100, 0.2, 0.3)])]


def test_best_performance_is_the_quantile_normalised_by_online(tmp_path):
  runs = report.load_runs(synthetic_runs(tmp_path))
  stats = report.best_performance(runs)["tldr"]
  # Online: 0.1, 0.2, ..., 1.0 sorted; position 0.9 * 9 = 8.1 -> 0.9 + 0.1 * 0.1 = 0.91.
  assert stats["online"]["points"] == 10
  assert stats["online"]["quantile"] == pytest.approx(0.91)
  assert stats["online"]["normalised"] == pytest.approx(1.0)
  # Offline: 0.2, 0.4 -> 0.2 + 0.9 * 0.2 = 0.38; / 0.91.
  assert stats["offline"]["points"] == 2
  assert stats["offline"]["quantile"] == pytest.approx(0.38)
  assert stats["offline"]["normalised"] == pytest.approx(0.38 / 0.91)
  # Tandem: 0.3, 0.35 -> 0.3 + 0.9 * 0.05 = 0.345.
  assert stats["tandem"]["quantile"] == pytest.approx(0.345)
  # A task without an online run has no normalised value.
  assert report.best_performance(runs)["hh helpful"]["offline"]["normalised"] is None
  median = report.best_performance(runs, quantile=0.5)["tldr"]["offline"]["quantile"]
  assert median == pytest.approx(0.3)


def test_run_summary_by_hand(tmp_path):
  runs = {(r.method, r.run): r for r in report.load_runs(synthetic_runs(tmp_path))}
  online_a = report.run_summary(runs["online", "online_a"])
  # Best: step 200 (0.6, KL 1.0); final: step 500 (KL 2.5); the SFT row is not a checkpoint.
  assert (online_a["checkpoints"], online_a["best_win_rate"], online_a["kl_at_best"],
          online_a["step_at_best"], online_a["final_step"], online_a["final_kl"],
          online_a["final_accuracy_d_golden"]) == (5, 0.6, 1.0, 200, 500, 2.5, 0.4)
  offline = report.run_summary(runs["offline", "offline_lr3e-6"])
  assert (offline["checkpoints"], offline["final_step"], offline["final_kl"],
          offline["final_accuracy_d_golden"]) == (2, 400, 3.0, 0.65)


def test_make_report_writes_tables_and_images(tmp_path):
  paths = report.make_report(runs=synthetic_runs(tmp_path), output_dir=tmp_path / "out",
                             title="Synthetic study")
  assert set(paths) == {"report", "summary", "frontier_tldr", "accuracy_tldr", "drift_tldr",
                        "frontier_hh helpful", "accuracy_hh helpful", "drift_hh helpful"}
  assert paths["frontier_hh helpful"].endswith("frontier_hh_helpful.png")
  for name, path in paths.items():
    if path.endswith(".png"):
      image = matplotlib.image.imread(path)
      assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
      assert np.ptp(image[..., :3]) > 0, name  # not a blank canvas
  text = open(paths["report"]).read()
  assert text.startswith("# Synthetic study\n")
  assert "![KL vs win rate, tldr](frontier_tldr.png)" in text
  # method | run | checkpoints | best | KL at best | step at best | final step | final KL |
  # final accuracy (D_golden) | final accuracy (online)
  assert "| online | online_a | 5 | 0.600 | 1 | 200 | 500 | 2.5 | 0.400 | n/a |" in text
  assert "| online | online_b | 5 | 1.000 | 2 | 200 | 500 | 5 | 0.450 | 0.700 |" in text
  assert "| offline | offline_lr3e-6 | 2 | 0.400 | 3 | 400 | 400 | 3 | 0.650 | n/a |" in text
  assert "| tandem | tandem_1 | 2 | 0.350 | 2 | 200 | 400 | 4 | n/a | n/a |" in text
  assert "SFT policy win rate: 0.250" in text
  assert "| online | 10 | 0.910 | 1.000 |" in text
  assert "| offline | 2 | 0.380 | 0.418 |" in text  # 0.38 / 0.91 = 0.4176
  assert "| tandem | 2 | 0.345 | 0.379 |" in text  # 0.345 / 0.91 = 0.3791
  assert "| offline | 1 | 0.300 | n/a |" in text  # hh helpful: no online run
  # Methods appear in the fixed order online, offline, tandem.
  assert text.index("| online | online_a") < text.index("| offline | offline_lr3e-6")
  assert text.index("| offline | offline_lr3e-6") < text.index("| tandem | tandem_1")
  summary = json.loads(open(paths["summary"]).read())
  assert summary["best_performance"]["tldr"]["offline"]["quantile"] == pytest.approx(0.38)


def test_dict_form_and_bad_entries(tmp_path):
  rows = [row(100, 1.0, 0.5)]
  runs = report.load_runs({"tldr/online/a": rows, ("tldr", "offline", "b"): rows})
  assert [(r.task, r.method, r.run) for r in runs] == [("tldr", "online", "a"),
                                                      ("tldr", "offline", "b")]
  with pytest.raises(ValueError, match="'task/method/run'"):
    report.load_runs({"tldr/online": rows})
  with pytest.raises(ValueError, match=r"run tldr/online/a: row 0 \(step 100\) has no field "
                                       "'win_rate'"):
    report.load_runs([("tldr", "online", "a", [{"step": 100, "kl": 1.0}])])
  with pytest.raises(ValueError, match="given twice"):
    report.load_runs([("t", "m", "r", rows), ("t", "m", "r", rows)])


def test_study_report_and_command_line(tmp_path):
  eval_dir = tmp_path / "eval"
  names = {"online": 0.5, "offline_lr1e-05_beta0.1_steps4000": 0.3, "tandem_lr1e-05_beta0.1": 0.4,
           "bo2_online": 0.45}
  for name, win_rate in names.items():
    (eval_dir / name).mkdir(parents=True)
    (eval_dir / name / "eval.jsonl").write_text(json.dumps(row(100, 1.0, win_rate)) + "\n")
  (eval_dir / "not_evaluated").mkdir()
  assert report.study_method("offline_lr1e-05_beta0.1_steps4000") == "offline"
  assert report.study_method("bo2_online") == "bo2_online"
  assert report.study_method("online_lr0.0001_beta0.1_seed2") == "online"
  assert report.study_method("tandem_lr3e-05_beta0.1_seed0") == "tandem"
  paths = report.study_report(eval_dir=eval_dir, output_dir=tmp_path / "report", task="mini")
  text = open(paths["report"]).read()
  assert "| offline | offline_lr1e-05_beta0.1_steps4000 | 1 | 0.300 |" in text
  assert "| bo2_online | 1 | 0.450 | 0.900 |" in text  # 0.45 / 0.5
  assert "not_evaluated" not in text
  assert report.main(["--output_dir", str(tmp_path / "cli"), "--title", "CLI",
                      f"mini/online/a={eval_dir / 'online' / 'eval.jsonl'}"]) == 0
  assert open(tmp_path / "cli" / "report.md").read().startswith("# CLI\n")
  with pytest.raises(SystemExit):
    report.main(["--output_dir", str(tmp_path / "x"), "mini/online=path"])
