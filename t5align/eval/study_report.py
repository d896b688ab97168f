"""The study's report: protocol, gates, per-run table, claims with intervals, figure panels.

``write`` turns a finished study's ``eval/`` directory (``runs.json``, every
run's rows and saved per-prompt arrays) and its ``gates/`` record into, in
the report directory:

* ``report.md``: the protocol fixed before any result (header), where and
  how the numbers were made (commit, command, platform, CPU), the gates
  table, the claims table (statistic, 95% bootstrap interval, verdict by the
  stated rule; ``t5align.eval.claims``), the per-run table with standard
  errors and, in the miniature world, the validity columns, and the paper's
  90%-quantile statistic;
* one figure per experiment, drawn as the paper draws it: ``fig1_online_offline.png``,
  ``fig4_tandem.png``, ``fig9_best_of_2.png``, ``fig12_fixed_policy.png``,
  ``fig13_windows.png`` (points with standard-error bars, each method's upper
  envelope as a line, the SFT policy dotted, the legend outside the axes),
  ``fig6_online_pairs.png`` (proxy-vs-golden agreement along each online
  stream), plus the generic ``frontier_/accuracy_/drift_<task>.png``;
* ``summary.json``: every number of the report, machine-readable.

Everything but the provenance lines is a function of the evaluation files,
so a rerun of the same study on the same machine writes the same
``summary.json`` byte for byte; provenance (which differs by machine and
checkout) is only in ``report.md`` and ``provenance.json``.
"""

import io
import json
import os
import platform
import subprocess
import sys
from typing import Optional

from matplotlib import figure as mpl_figure
import numpy as np

from t5align.eval import claims as claims_lib
from t5align.eval import evaluate
from t5align.eval import report as report_lib
from t5align.eval import statistics as st

# Each panel: (file stem, title, methods drawn).
PANELS = (
    ("fig1_online_offline", "Fig. 1: online vs offline IPO", ("online", "offline")),
    ("fig4_tandem", "Fig. 4: online, tandem, offline", ("online", "tandem", "offline")),
    ("fig9_best_of_2", "Fig. 9: Best-of-2", ("bo2_online", "bo2_offline", "bo2_tandem")),
    ("fig12_fixed_policy", "Fig. 5 / 12: offline on fixed-policy datasets", ("offline", "fixed_*")),
    ("fig13_windows", "Fig. 13: shuffling the online stream",
     ("online_replayed", "sanity_replay", "window_*")),
)


def provenance(command: Optional[str] = None) -> dict:
  """Where and how the numbers were made: commit, command, platform, CPU, versions."""
  import jax  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."],
                                capture_output=True, text=True, timeout=10).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    commit, dirty = "unknown (not a git checkout)", False
  cpu = platform.processor() or "unknown"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = f"{names[0]} x {len(names)}"
  return {"commit": commit + (" (with uncommitted changes)" if dirty else ""),
          "command": command or " ".join(["t5align", *sys.argv[1:]]),
          "platform": platform.platform(), "cpu": cpu, "python": platform.python_version(),
          "jax": jax.__version__, "devices": str(jax.devices())}


def _panel_methods(wanted, methods):
  out = []
  for name in wanted:
    if name.endswith("*"):
      out += sorted(m for m in methods if m.startswith(name[:-1]))
    elif name in methods:
      out.append(name)
  return out


def _draw_panel(ax, runs, methods, styles, rows_by_run, sft_win_rate, title, field="wins"):
  for method in methods:
    color, marker = styles[method]
    curves = []
    for run in (r for r in runs if r.method == method):
      rows = rows_by_run[run.name]
      kl = np.array([r["kl"] for r in rows])
      ok = kl > 0
      x = np.log(kl[ok])
      y = np.array([r["win_rate"] for r in rows])[ok]
      xerr = (np.array([r["kl_stderr"] for r in rows])[ok] / kl[ok])
      yerr = np.array([r["win_rate_stderr"] for r in rows])[ok]
      ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=color, marker=marker, markersize=3,
                  linestyle="none", elinewidth=0.6, alpha=0.6)
      curves.append(st.curve(x, y))
    span = st.kl_range(curves)
    if span is not None and span[0] < span[1]:
      grid = np.linspace(*span, 200)
      ax.plot(grid, st.envelope(curves, grid), color=color, linewidth=1.6, label=method)
    elif curves:
      ax.plot([], [], color=color, label=method)
  if sft_win_rate is not None:
    ax.axhline(sft_win_rate, color="black", linestyle=":", linewidth=1, label="SFT")
  ax.set_xlabel("log KL(π ‖ π_sft)")
  ax.set_ylabel("win rate vs golden policy")
  ax.set_title(title, fontsize="medium")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(fig, path):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  report_lib._atomic_write(path, buffer.getvalue())  # pylint: disable=protected-access


def _draw_stream_agreement(ax, eval_dir, described, styles):
  drawn = False
  for name in sorted(described):
    path = os.path.join(eval_dir, name, evaluate.STREAM_AGREEMENT_FILE)
    if described[name]["method"] not in ("online", "bo2_online") or not os.path.exists(path):
      continue
    with open(path) as f:
      bins = json.load(f)["bins"]
    color, marker = styles.get(described[name]["method"], ("tab:gray", "o"))
    steps = [b["step"] for b in bins]
    values = [b["proxy_golden_agreement"] for b in bins]
    errors = [np.std(b["agreement_values"]) / np.sqrt(len(b["agreement_values"])) for b in bins]
    ax.errorbar(steps, values, yerr=errors, color=color, marker=marker, markersize=3,
                linewidth=1, alpha=0.7, label=name)
    drawn = True
  ax.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance")
  ax.set_xlabel("online training step (stream batch)")
  ax.set_ylabel("proxy PM agreement with golden labels")
  ax.set_title("Fig. 6: the proxy PM along the online stream", fontsize="medium")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  return drawn


def _fmt(value, spec=".3f"):
  return "n/a" if value is None else format(value, spec)


def _interval(interval):
  return "n/a" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def run_table(described, rows_by_run, oracle: bool) -> list[dict]:
  """Per run: its description, best and final checkpoint, with standard errors."""
  out = []
  for name in sorted(rows_by_run, key=lambda n: (described[n]["method"], n)):
    rows = rows_by_run[name]
    if not rows:
      continue
    best = max(rows, key=lambda r: (r["win_rate"], -r["step"]))
    final = rows[-1]
    entry = {"run": name, **{k: described[name][k] for k in ("method", "seed", "learning_rate",
                                                             "beta", "steps")},
             "checkpoints": len(rows), "best_step": best["step"],
             "best_win_rate": best["win_rate"], "best_win_rate_stderr": best["win_rate_stderr"],
             "kl_at_best": best["kl"], "kl_at_best_stderr": best["kl_stderr"],
             "final_win_rate": final["win_rate"], "final_kl": final["kl"],
             "final_accuracy_d_golden": final.get("accuracy_d_golden"),
             "final_accuracy_online": final.get("accuracy_online"),
             "final_drift_winner": final.get("drift_winner")}
    if oracle:
      for key in ("oracle_win_rate", "golden_oracle_agreement", "repetitions", "oracle_quality"):
        entry[f"best_{key}"] = best.get(key)
        entry[f"final_{key}"] = final.get(key)
    out.append(entry)
  return out


PROTOCOL = """\
Fixed before any policy result was looked at (docs/results/README.md, "Protocol"):

- **SFT** is trained to fit D_golden (about 3 epochs, paper App. C); **PMs** are trained to
  their validation plateau and their best validation checkpoint is used.
- **Gates** (below) are measured before any policy stage; a failed gate is reported, the
  study goes on.
- **Training seeds** {seeds} for online, offline and tandem (separate from the world seed
  {world_seed}, which fixes data, PMs, SFT, golden policy and every evaluation draw); the
  variants (Best-of-2, sanity replay, windows, fixed-policy datasets) run at seed {first_seed}.
- **Grid**: online {online_grid}; offline {offline_grid}; every run has {checkpoints}.
- **Evaluation** of every checkpoint: KL to SFT on {kl_prompts} prompts, win rate against the
  golden policy judged by the golden PM on {winrate_prompts} prompts (same prompts and golden
  samples for every checkpoint), classification on {pairs} D_golden pairs and {pairs} online
  pairs with golden labels.
- **Statistics**: every point carries its standard error over prompts. Methods are compared by
  their upper envelopes over all runs and checkpoints, interpolated on log KL, on the log-KL range
  they share; 95% intervals are percentile bootstraps ({resamples} resamples) over prompts and
  pairs (paired across checkpoints) and over training seeds.
- **Verdict rules**: "A > B" is *reproduced* when the whole interval of A - B is above 0, *not
  reproduced* when below 0, else *inconclusive*; "A ≈ B" is reproduced when the interval lies
  within ±{margin}, not reproduced when it lies outside, else inconclusive; "exact" compares
  bit for bit.
"""


def write(*, eval_dir: str, output_dir: str, task: str, gates_dir: Optional[str] = None,
          study_config=None, num_resamples: int = 1000, command: Optional[str] = None) -> dict:
  """Writes the study report (module docstring); returns ``{name: path}``."""
  os.makedirs(output_dir, exist_ok=True)
  runs, described = claims_lib.load_study(eval_dir)
  oracle = task == "mini"
  rows_by_run = {name: [r for r in evaluate.read_rows(os.path.join(eval_dir, name, "eval.jsonl"))
                        if r.get("checkpoint") != evaluate.SFT_CHECKPOINT]
                 for name in described}
  sft_rows = [r for name in described for r in evaluate.read_rows(
      os.path.join(eval_dir, name, "eval.jsonl")) if r.get("checkpoint") == evaluate.SFT_CHECKPOINT]
  sft_win_rate = sft_rows[0]["win_rate"] if sft_rows else None
  claim_rows = claims_lib.evaluate_claims(runs, described, oracle=oracle,
                                          num_resamples=num_resamples)
  paths = report_lib.make_report(
      runs=[(task, described[name]["method"], name, os.path.join(eval_dir, name, "eval.jsonl"))
            for name in sorted(described)], output_dir=output_dir, title=f"t5align study: {task}")
  # The per-panel methods: the replayed online run is drawn under its own label.
  panel_runs = claims_lib.with_replayed_source(runs, described)
  methods = {r.method for r in panel_runs}
  styles = report_lib._styles(sorted(methods | {"online_replayed"}))  # pylint: disable=protected-access
  styles["online_replayed"] = report_lib._KNOWN_STYLES["online"]  # pylint: disable=protected-access
  figures = []
  for stem, title, wanted in PANELS:
    drawn = _panel_methods(wanted, methods)
    if len(drawn) < 2:
      continue
    fig = mpl_figure.Figure(figsize=(7.6, 4.2), layout="constrained")
    _draw_panel(fig.add_subplot(), panel_runs, drawn, styles, rows_by_run, sft_win_rate,
                f"{task} — {title}")
    paths[stem] = os.path.join(output_dir, f"{stem}.png")
    _save(fig, paths[stem])
    figures.append(stem)
  fig = mpl_figure.Figure(figsize=(7.6, 4.2), layout="constrained")
  if _draw_stream_agreement(fig.add_subplot(), eval_dir, described, styles):
    paths["fig6_online_pairs"] = os.path.join(output_dir, "fig6_online_pairs.png")
    _save(fig, paths["fig6_online_pairs"])
    figures.append("fig6_online_pairs")

  gates = None
  if gates_dir and os.path.exists(os.path.join(gates_dir, "gates.json")):
    with open(os.path.join(gates_dir, "gates.json")) as f:
      gates = json.load(f)
  table = run_table(described, rows_by_run, oracle)
  with open(paths["summary"]) as f:
    generic = json.load(f)
  summary = {"task": task, "claims": claim_rows, "runs": table, "gates": gates,
             "best_performance": generic["best_performance"], "sft_win_rate": sft_win_rate}
  paths["summary"] = os.path.join(output_dir, "summary.json")
  report_lib._atomic_write(paths["summary"], (json.dumps(summary, indent=2, sort_keys=True)  # pylint: disable=protected-access
                                              + "\n").encode())
  where = provenance(command)
  report_lib._atomic_write(os.path.join(output_dir, "provenance.json"),  # pylint: disable=protected-access
                           (json.dumps(where, indent=2) + "\n").encode())
  markdown = _markdown(task, where, study_config, described, gates, claim_rows, table,
                       generic["best_performance"], figures, sft_win_rate, oracle, num_resamples)
  report_lib._atomic_write(paths["report"], markdown.encode())  # pylint: disable=protected-access
  return paths


def _protocol(c, described, num_resamples) -> str:
  if c is None:
    return ""
  online = sorted({(d["learning_rate"], d["beta"]) for d in described.values()
                   if d["method"] == "online"})
  offline = sorted({(d["learning_rate"], d["beta"], d["steps"]) for d in described.values()
                    if d["method"] == "offline"})
  every = (f"{c.checkpoints_per_run} evenly spaced checkpoints" if c.checkpoints_per_run
           else f"a checkpoint every {c.checkpoint_every} steps")
  return PROTOCOL.format(
      seeds=tuple(c.training_seeds), world_seed=c.seed, first_seed=c.training_seeds[0],
      online_grid=", ".join(f"LR {lr:g} beta {b:g}" for lr, b in online)
      + f" ({c.online_steps} steps)",
      offline_grid=", ".join(f"LR {lr:g} beta {b:g} {n} steps" for lr, b, n in offline),
      checkpoints=every, kl_prompts=c.num_kl_prompts, winrate_prompts=c.num_winrate_prompts,
      pairs=c.num_classification_pairs, resamples=num_resamples, margin=st.SIMILARITY_MARGIN)


def _markdown(task, where, c, described, gates, claim_rows, table, performance, figures,
              sft_win_rate, oracle, num_resamples) -> str:
  from t5align.eval import gates as gates_lib  # pylint: disable=g-import-not-at-top
  lines = [f"# t5align study: {task}", "",
           f"Produced by `{where['command']}` at commit {where['commit']} on {where['platform']}, "
           f"CPU {where['cpu']}, jax {where['jax']}.", "", "## Protocol", "",
           _protocol(c, described, num_resamples), "## Gates (measured before any policy run)", ""]
  lines += [gates_lib.gates_markdown(gates) if gates else "No gates record.", ""]
  lines += ["## The paper's claims", "",
            "| claim (paper) | statistic | kind | value | 95% interval | verdict |",
            "|---|---|---|---:|---|---|"]
  for row in claim_rows:
    value = row["value"]
    lines.append(f"| {row['paper']} | {row['statistic']} | {row['kind']} "
                 f"| {_fmt(value, '+.3f') if value is not None else 'n/a'} "
                 f"| {_interval(row['interval'])} | **{row['verdict']}** |")
  lines += ["", "Interval notes: " + "; ".join(f"{r['key']}: {r['note']}" for r in claim_rows
                                               if r.get("note")), ""]
  lines += ["## Figures", ""] + [f"![{stem}]({stem}.png)" for stem in figures] + [
      "", f"![frontier](frontier_{task}.png) ![accuracy](accuracy_{task}.png) "
      f"![drift](drift_{task}.png)", ""]
  header = ("| method | run | seed | LR | beta | steps | best win rate ± s.e. | KL at best ± s.e. "
            "| step at best | final win rate | final KL | final acc. D_golden | final acc. online")
  align = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
  if oracle:
    header += (" | oracle win rate (best) | golden-oracle agreement (best) | repetitions (best) "
               "| oracle win rate (final) | repetitions (final)")
    align += "|---:|---:|---:|---:|---:"
  lines += ["## Runs", "", f"SFT policy win rate: {_fmt(sft_win_rate)}.", "", header + " |",
            align + "|"]
  for r in table:
    line = (f"| {r['method']} | {r['run']} | {r['seed']} | {_fmt(r['learning_rate'], 'g')} "
            f"| {_fmt(r['beta'], 'g')} | {r['steps']} "
            f"| {r['best_win_rate']:.3f} ± {r['best_win_rate_stderr']:.3f} "
            f"| {r['kl_at_best']:.3g} ± {r['kl_at_best_stderr']:.2g} | {r['best_step']} "
            f"| {r['final_win_rate']:.3f} | {r['final_kl']:.3g} "
            f"| {_fmt(r['final_accuracy_d_golden'])} | {_fmt(r['final_accuracy_online'])}")
    if oracle:
      line += (f" | {_fmt(r['best_oracle_win_rate'])} | {_fmt(r['best_golden_oracle_agreement'])}"
               f" | {_fmt(r['best_repetitions'], '.2f')} | {_fmt(r['final_oracle_win_rate'])}"
               f" | {_fmt(r['final_repetitions'], '.2f')}")
    lines.append(line + " |")
  lines += ["", "## Best performance (Fig. 11 statistic)", "",
            "90% quantile of the win rate over all checkpoints of a method, ÷ online's.", "",
            "| method | points | 90% quantile | ÷ online |", "|---|---:|---:|---:|"]
  for method, stat in performance.get(task, {}).items():
    lines.append(f"| {method} | {stat['points']} | {_fmt(stat['quantile'])} "
                 f"| {_fmt(stat['normalised'])} |")
  return "\n".join(lines) + "\n"
