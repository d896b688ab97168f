"""Tests of the gates' rules in t5align.eval.gates (the measurements run in the quick study)."""

import json

from t5align.eval import gates


def _curve(tmp_path, scores, best=None):
  path = tmp_path / "best_checkpoint.json"
  best = best if best is not None else max(scores, key=lambda s: (scores[s], s))
  path.write_text(json.dumps({"step": best, "validation_accuracy": scores[best],
                              "all": {str(k): v for k, v in scores.items()}}))
  return str(path)


def test_plateau_rule(tmp_path):
  rising = gates.plateau(_curve(tmp_path, {100: 0.60, 200: 0.65, 300: 0.70}))
  assert rising["best_step"] == rising["last_step"] == 300 and not rising["levelled_off"]
  assert rising["last_gain"] == 0.70 - 0.65
  peaked = gates.plateau(_curve(tmp_path, {100: 0.60, 200: 0.72, 300: 0.70}))
  assert peaked["best_step"] == 200 and peaked["levelled_off"]
  flat = gates.plateau(_curve(tmp_path, {100: 0.60, 200: 0.700, 300: 0.705}))
  assert flat["best_step"] == 300 and flat["levelled_off"]  # gains less than 0.01
  assert flat["curve"] == [(100, 0.60), (200, 0.700), (300, 0.705)]


def test_markdown_reports_failed_gates(tmp_path):
  record = {"gates": [{"gate": "a", "value": 0.5, "rule": "r", "passed": True},
                      {"gate": "b", "value": 1.5, "rule": "r", "passed": False},
                      {"gate": "c", "value": None, "rule": "r", "passed": None}],
            "sft_fit": {"prompts": 4}, "agreement": {"x": 0.25},
            "golden_pm": gates.plateau(_curve(tmp_path, {1: 0.5, 2: 0.6})),
            "proxy_pm": gates.plateau(_curve(tmp_path, {1: 0.5, 2: 0.6}))}
  table = gates.gates_markdown(record)
  assert "| a | 0.500 | r | pass |" in table
  assert "| b | 1.500 | r | **FAIL** |" in table
  assert "| c | n/a | r | not applicable |" in table
  assert "| x | 0.250 |" in table
