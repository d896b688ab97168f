"""Reports over evaluated runs: KL-vs-win-rate frontiers, training curves, tables.

Input: the rows ``evaluate.evaluate_run`` wrote for each run, labelled with the
run's task, method (``online``, ``offline``, ``tandem``, ``best_of_2`` or any
other label) and name. Output, in one directory:

* ``frontier_<task>.png``: win rate against the golden policy (y) over the
  natural log of KL(pi || pi_sft) (x), as the paper's Fig. 1 plots it; one
  colour and marker per method, one point per checkpoint, each run's points
  joined in step order. Checkpoints with KL = 0 have no log KL and are left
  out; the SFT policy's win rate (a step-0 row) is a dotted horizontal line.
* ``accuracy_<task>.png``: the policy-as-classifier accuracy over training
  (D_golden solid, online-stream pairs dashed), as in Fig. 8 (left); curves
  start at the SFT row (step 0) when the run has one.
* ``drift_<task>.png``: log pi(y_w) - log pi_sft(y_w) (solid) and the same
  for y_l (dashed) over training, as in Fig. 8 (right).
* ``report.md``: per run the best win rate, its KL and step, the final step,
  KL and accuracy; per task and method the "best performance" statistic of
  Fig. 11: the 90% quantile of the win rate over all checkpoints of all runs of
  the method, divided by the same quantile of the online method.
* ``summary.json``: the same numbers, machine-readable.

Quantiles use numpy's default linear interpolation between order statistics
(Hyndman-Fan type 7). The SFT row of a run (``checkpoint == 'sft'``) is the
shared starting point, not a result of the method: it is drawn as the
reference line (and the first point of the training curves) and left out of
every statistic.
"""

import argparse
import dataclasses
import io
import json
import math
import os
import re
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

from matplotlib import figure as mpl_figure
from matplotlib import lines as mpl_lines
import numpy as np

from t5align.eval import evaluate

PathLike = Union[str, os.PathLike]
Rows = Sequence[Mapping[str, Any]]

# Fixed styles for the paper's methods so that figures of different reports
# agree; other labels take the remaining styles in sorted order.
# The bo2_* labels are the study runner's Best-of-2 runs (see study_report).
_KNOWN_STYLES = {
    "online": ("tab:blue", "o"),
    "offline": ("tab:orange", "s"),
    "tandem": ("tab:green", "^"),
    "best_of_2": ("tab:red", "D"),
    "bo2_online": ("tab:red", "D"),
    "bo2_offline": ("tab:brown", "P"),
    "bo2_tandem": ("tab:pink", "X"),
}
_OTHER_STYLES = (("tab:purple", "v"), ("tab:olive", "<"), ("tab:cyan", ">"),
                 ("tab:gray", "*"), ("black", "h"))
_REQUIRED_FIELDS = ("step", "kl", "win_rate")


@dataclasses.dataclass(frozen=True)
class RunRows:
  """The evaluation rows of one run, sorted by step, with its labels."""
  task: str
  method: str
  run: str
  rows: tuple  # of row dicts, ascending step, SFT row excluded
  sft_row: Optional[dict] = None


def load_runs(runs) -> list[RunRows]:
  """Normalises the accepted forms of ``runs`` (see ``make_report``)."""
  if isinstance(runs, Mapping):
    entries = []
    for key, rows in runs.items():
      if isinstance(key, str):
        key = tuple(key.split("/"))
      if not isinstance(key, tuple) or len(key) != 3:
        raise ValueError(f"runs key {key!r} must be a (task, method, run) tuple or a "
                         "'task/method/run' string")
      entries.append((*key, rows))
  else:
    entries = list(runs)
  out, seen = [], set()
  for number, entry in enumerate(entries):
    if not isinstance(entry, (tuple, list)) or len(entry) != 4:
      raise ValueError(f"runs entry {number} must be (task, method, run, rows or eval JSONL "
                       f"path), got {entry!r}")
    task, method, run, rows = entry
    if (task, method, run) in seen:
      raise ValueError(f"runs entry {number}: run {task}/{method}/{run} is given twice")
    seen.add((task, method, run))
    where = f"run {task}/{method}/{run}"
    if isinstance(rows, (str, os.PathLike)):
      where = f"{where} ({os.fspath(rows)})"
      rows = evaluate.read_rows(os.fspath(rows))
    kept, sft_row = [], None
    for index, row in enumerate(rows):
      if "error" in row:
        continue
      for field in _REQUIRED_FIELDS:
        if row.get(field) is None:
          raise ValueError(f"{where}: row {index} (step {row.get('step')}) has no field "
                           f"'{field}'")
      if row.get("checkpoint") == evaluate.SFT_CHECKPOINT:
        sft_row = dict(row)
      else:
        kept.append(dict(row))
    kept.sort(key=lambda r: r["step"])
    out.append(RunRows(str(task), str(method), str(run), tuple(kept), sft_row))
  return out


def _quantile(values: Sequence[float], q: float) -> Optional[float]:
  return float(np.quantile(np.asarray(values, np.float64), q)) if len(values) else None


def best_performance(runs: Sequence[RunRows], *, quantile: float = 0.9,
                     baseline_method: str = "online") -> dict[str, dict[str, dict]]:
  """``{task: {method: {'points', 'quantile', 'normalised'}}}`` (paper Fig. 11).

  ``quantile`` is the q-quantile of the win rates of all checkpoints of all
  runs of the method on the task; ``normalised`` divides it by the baseline
  method's (None when the task has no baseline run or its quantile is 0).
  """
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}")
  win_rates: dict[str, dict[str, list[float]]] = {}
  for run in runs:
    win_rates.setdefault(run.task, {}).setdefault(run.method, []).extend(
        float(r["win_rate"]) for r in run.rows)
  result = {}
  for task, by_method in win_rates.items():
    baseline = _quantile(by_method.get(baseline_method, []), quantile)
    result[task] = {}
    for method in _method_order(by_method):
      value = _quantile(by_method[method], quantile)
      result[task][method] = {
          "points": len(by_method[method]), "quantile": value,
          "normalised": (value / baseline if value is not None and baseline else None)}
  return result


def run_summary(run: RunRows) -> dict:
  """Best win rate (with its KL and step) and the final step's KL and accuracies."""
  summary = {"task": run.task, "method": run.method, "run": run.run,
             "checkpoints": len(run.rows)}
  if not run.rows:
    return summary
  best = max(run.rows, key=lambda r: (r["win_rate"], -r["step"]))  # earliest of equals
  final = run.rows[-1]
  summary.update({
      "best_win_rate": best["win_rate"], "kl_at_best": best["kl"], "step_at_best": best["step"],
      "final_step": final["step"], "final_win_rate": final["win_rate"], "final_kl": final["kl"],
      "final_accuracy_d_golden": final.get("accuracy_d_golden"),
      "final_accuracy_online": final.get("accuracy_online")})
  return summary


def make_report(*, runs, output_dir: PathLike, title: str = "t5align evaluation",
                quantile: float = 0.9, baseline_method: str = "online") -> dict[str, str]:
  """Writes the plots, ``report.md`` and ``summary.json`` of a set of runs.

  Args:
    runs: the runs, as a list of ``(task, method, run_name, rows)`` entries or
      a dict ``{(task, method, run_name) or 'task/method/run_name': rows}``;
      ``rows`` is a list of ``evaluate_run`` row dicts or the path of an
      ``evaluate_run`` JSONL file.
    output_dir: where the files go (created if missing).
    title: the markdown title.
    quantile: the quantile of the best-performance statistic (paper: 0.9).
    baseline_method: the method the statistic is normalised by (paper: online).

  Returns:
    ``{name: path}`` of every file written ('report', 'summary', and
    'frontier_<task>', 'accuracy_<task>', 'drift_<task>' per task).
  """
  loaded = load_runs(runs)
  if not loaded:
    raise ValueError("make_report needs at least one run")
  output_dir = os.fspath(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  tasks = sorted({r.task for r in loaded})
  styles = _styles(sorted({r.method for r in loaded}))
  paths = {}
  for task in tasks:
    task_runs = [r for r in loaded if r.task == task]
    slug = _slug(task)
    for kind, draw in (("frontier", _draw_frontier), ("accuracy", _draw_accuracy),
                       ("drift", _draw_drift)):
      path = os.path.join(output_dir, f"{kind}_{slug}.png")
      fig = mpl_figure.Figure(figsize=(6.4, 4.4), layout="constrained")
      draw(fig.add_subplot(), task_runs, styles, task)
      buffer = io.BytesIO()
      fig.savefig(buffer, format="png", dpi=110)
      _atomic_write(path, buffer.getvalue())
      paths[f"{kind}_{task}"] = path
  performance = best_performance(loaded, quantile=quantile, baseline_method=baseline_method)
  summaries = [run_summary(r) for r in loaded]
  markdown = _markdown(title, tasks, loaded, summaries, performance, quantile, baseline_method)
  paths["report"] = os.path.join(output_dir, "report.md")
  _atomic_write(paths["report"], markdown.encode())
  summary = {"title": title, "quantile": quantile, "baseline_method": baseline_method,
             "runs": summaries, "best_performance": performance}
  paths["summary"] = os.path.join(output_dir, "summary.json")
  _atomic_write(paths["summary"], (json.dumps(summary, indent=2) + "\n").encode())
  return paths


def study_method(run_name: str) -> str:
  """A study run's method label: its name up to ``_lr`` or ``_seed`` (``offline_lr1e-05_...``
  -> offline)."""
  return re.sub(r"_seed\d+$", "", run_name.split("_lr", 1)[0])


def _study_runs(eval_dir: PathLike, task: str) -> list[tuple]:
  eval_dir = os.fspath(eval_dir)
  paths = [(name, os.path.join(eval_dir, name, "eval.jsonl"))
           for name in sorted(os.listdir(eval_dir))]
  return [(task, study_method(name), name, path) for name, path in paths
          if os.path.isfile(path)]


def study_report(*, eval_dir: PathLike, output_dir: PathLike, task: str,
                 title: Optional[str] = None, quantile: float = 0.9,
                 gates_dir: Optional[PathLike] = None) -> dict[str, str]:
  """``make_report`` over a study's ``<eval_dir>/<run name>/eval.jsonl`` files.

  Run names are the study runner's (``online``, ``offline_lr3e-06_beta0.1_steps4000``,
  ``tandem_lr...``, ``bo2_online`` ...); methods come from ``study_method``.
  """
  runs = _study_runs(eval_dir, task)
  if not runs:
    raise FileNotFoundError(f"no <run>/eval.jsonl under {eval_dir}")
  return make_report(runs=runs, output_dir=output_dir, quantile=quantile,
                     title=title or f"t5align study: {task}")


def main(argv: Sequence[str]) -> int:
  """``t5align report``; see docs/evaluation.md."""
  parser = argparse.ArgumentParser(
      prog="t5align report",
      description="KL-vs-win-rate frontiers, training curves and summary tables of evaluated "
                  "runs.")
  parser.add_argument("runs", nargs="*", metavar="TASK/METHOD/RUN=EVAL_JSONL",
                      help="one evaluated run: its labels and the eval.jsonl of evaluate_run")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--eval_dir", help="a study's eval directory (<run name>/eval.jsonl); "
                                         "needs --task")
  parser.add_argument("--task", help="the task label of the --eval_dir runs")
  parser.add_argument("--title", default=None)
  parser.add_argument("--quantile", type=float, default=0.9)
  parser.add_argument("--baseline_method", default="online")
  args = parser.parse_args(list(argv))
  runs = []
  for spec in args.runs:
    labels, sep, path = spec.partition("=")
    if not sep or labels.count("/") != 2 or not path:
      parser.error(f"run {spec!r}: expected TASK/METHOD/RUN=EVAL_JSONL")
    runs.append((*labels.split("/"), path))
  if args.eval_dir:
    if not args.task:
      parser.error("--eval_dir needs --task")
    if not runs and os.path.exists(os.path.join(args.eval_dir, "runs.json")):
      # A study's eval directory: the full study report (claims, intervals, panels).
      from t5align.eval import study_report  # pylint: disable=g-import-not-at-top
      paths = study_report.write(eval_dir=args.eval_dir, output_dir=args.output_dir,
                                 task=args.task,
                                 gates_dir=os.path.join(os.path.dirname(
                                     os.path.abspath(args.eval_dir)), "gates"))
      print(f"report: {paths['report']}")
      return 0
    runs += _study_runs(args.eval_dir, args.task)
  if not runs:
    parser.error("give runs (TASK/METHOD/RUN=EVAL_JSONL) or --eval_dir with --task")
  paths = make_report(runs=runs, output_dir=args.output_dir,
                      title=args.title or "t5align evaluation", quantile=args.quantile,
                      baseline_method=args.baseline_method)
  print(f"report: {paths['report']}")
  return 0


def _method_order(methods) -> list[str]:
  known = [m for m in _KNOWN_STYLES if m in methods]
  return known + sorted(m for m in methods if m not in _KNOWN_STYLES)


def _styles(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
  others = iter(sorted(m for m in methods if m not in _KNOWN_STYLES))
  styles = {m: _KNOWN_STYLES[m] for m in methods if m in _KNOWN_STYLES}
  for i, method in enumerate(others):
    styles[method] = _OTHER_STYLES[i % len(_OTHER_STYLES)]
  return styles


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"


def _log_kl(row) -> Optional[float]:
  if row.get("log_kl") is not None:
    return float(row["log_kl"])
  return math.log(row["kl"]) if row["kl"] > 0 else None


def _method_legend(ax, runs, styles, extra=()):
  handles = [mpl_lines.Line2D([], [], color=styles[m][0], marker=styles[m][1], label=m)
             for m in _method_order({r.method for r in runs})]
  ax.legend(handles=handles + list(extra), fontsize="small")


def _sft_win_rate(runs) -> Optional[float]:
  values = [r.sft_row["win_rate"] for r in runs if r.sft_row is not None]
  return float(np.mean(values)) if values else None


def _draw_frontier(ax, runs, styles, task):
  for run in runs:
    points = [(_log_kl(r), r["win_rate"]) for r in run.rows if _log_kl(r) is not None]
    if points:
      color, marker = styles[run.method]
      ax.plot(*zip(*points), color=color, marker=marker, markersize=4, linewidth=1, alpha=0.8)
  extra = []
  sft = _sft_win_rate(runs)
  if sft is not None:
    extra.append(ax.axhline(sft, color="black", linestyle=":", linewidth=1, label="SFT"))
  ax.set_xlabel("log KL(π ‖ π_sft)")
  ax.set_ylabel("win rate vs golden policy")
  ax.set_title(f"{task}: KL vs win rate")
  ax.grid(alpha=0.3)
  _method_legend(ax, runs, styles, extra)


def _draw_curves(ax, runs, styles, fields):
  for run in runs:
    color, marker = styles[run.method]
    # The SFT row, when there is one, is where every curve starts (step 0).
    rows = ((run.sft_row,) if run.sft_row is not None else ()) + run.rows
    for field, linestyle in fields:
      points = [(r["step"], r[field]) for r in rows if r.get(field) is not None]
      if points:
        ax.plot(*zip(*points), color=color, marker=marker, markersize=3, linewidth=1,
                linestyle=linestyle, alpha=0.8)
  ax.set_xlabel("training step")
  ax.grid(alpha=0.3)


def _draw_accuracy(ax, runs, styles, task):
  _draw_curves(ax, runs, styles, (("accuracy_d_golden", "-"), ("accuracy_online", "--")))
  chance = ax.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance")
  ax.set_ylabel("policy-as-classifier accuracy")
  ax.set_title(f"{task}: accuracy (D_golden solid, online pairs dashed)")
  _method_legend(ax, runs, styles, [chance])


def _draw_drift(ax, runs, styles, task):
  _draw_curves(ax, runs, styles, (("drift_winner", "-"), ("drift_loser", "--")))
  ax.axhline(0.0, color="black", linestyle=":", linewidth=1)
  ax.set_ylabel("log π(y) − log π_sft(y)  [nats]")
  ax.set_title(f"{task}: log-likelihood drift (y_w solid, y_l dashed)")
  _method_legend(ax, runs, styles)


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def _markdown(title, tasks, runs, summaries, performance, quantile, baseline_method) -> str:
  percent = f"{100 * quantile:g}%"
  lines = [f"# {title}", ""]
  for task in tasks:
    slug = _slug(task)
    lines += [f"## Task `{task}`", "",
              f"![KL vs win rate, {task}](frontier_{slug}.png)", "",
              f"![accuracy, {task}](accuracy_{slug}.png) ![drift, {task}](drift_{slug}.png)", "",
              "| method | run | checkpoints | best win rate | KL at best | step at best "
              "| final step | final KL | final accuracy (D_golden) | final accuracy (online) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    task_summaries = [s for s in summaries if s["task"] == task]
    order = _method_order({s["method"] for s in task_summaries})
    for s in sorted(task_summaries, key=lambda s: (order.index(s["method"]), s["run"])):
      lines.append(
          f"| {s['method']} | {s['run']} | {s['checkpoints']} "
          f"| {_fmt(s.get('best_win_rate'), '.3f')} | {_fmt(s.get('kl_at_best'), '.4g')} "
          f"| {_fmt(s.get('step_at_best'), 'd')} | {_fmt(s.get('final_step'), 'd')} "
          f"| {_fmt(s.get('final_kl'), '.4g')} "
          f"| {_fmt(s.get('final_accuracy_d_golden'), '.3f')} "
          f"| {_fmt(s.get('final_accuracy_online'), '.3f')} |")
    sft = _sft_win_rate([r for r in runs if r.task == task])
    if sft is not None:
      lines += ["", f"SFT policy win rate: {sft:.3f}"]
    lines += ["", f"Best performance: {percent} quantile of the win rate over all checkpoints "
              f"of a method, divided by {baseline_method}'s.", "",
              f"| method | points | {percent} quantile | ÷ {baseline_method} |",
              "|---|---:|---:|---:|"]
    for method, stat in performance[task].items():
      lines.append(f"| {method} | {stat['points']} | {_fmt(stat['quantile'], '.3f')} "
                   f"| {_fmt(stat['normalised'], '.3f')} |")
    lines.append("")
  return "\n".join(lines)


def _atomic_write(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
