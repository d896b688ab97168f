"""The paper's claims as computed rows: a statistic, its 95% interval and a verdict.

``load_study`` reads a study's evaluation (``eval/runs.json``, every run's
``eval.jsonl`` and its saved per-prompt arrays) into ``statistics.Run``s;
``evaluate_claims`` computes every claim the study's runs cover. Each claim
names its statistic, which of the paper's figures it tests, and its kind
(``statistics.verdict``): the rules are fixed here, in code, before any
number is looked at, and the report prints them.

Statistics (``w`` is a win rate against the golden policy judged by the
golden PM unless a row says "oracle judge"; ``E_m`` is method m's upper
envelope over log KL, ``statistics.matched_difference``):

* matched-KL gap ``mean(E_a - E_b)`` over the log-KL range both cover;
* peak gap: best checkpoint win rate of a minus that of b;
* over-optimisation: mean over a method's runs of (best - final) win rate;
* final means: a quantity at each run's last checkpoint, averaged over runs;
* the paper's Fig. 11 statistic: the 90% quantile of all checkpoint win
  rates of a method, divided by online's, minus 1.
"""

import dataclasses
import json
import os
import re
from typing import Callable, Optional

import numpy as np

from t5align.eval import evaluate
from t5align.eval import statistics as st

RUNS_FILE = "runs.json"


def load_study(eval_dir: str) -> tuple[list[st.Run], dict]:
  """The study's runs with their per-checkpoint item arrays, and ``runs.json``."""
  with open(os.path.join(eval_dir, RUNS_FILE)) as f:
    described = json.load(f)
  runs = []
  for name in sorted(described):
    info = described[name]
    path = os.path.join(eval_dir, name, "eval.jsonl")
    rows = [r for r in evaluate.read_rows(path) if r.get("checkpoint") != evaluate.SFT_CHECKPOINT]
    if not rows:
      continue
    samples = evaluate.output_paths(path)["samples"]
    per_step = []
    for row in rows:
      with np.load(os.path.join(samples, f"step_{row['step']}.npz")) as arrays:
        per_step.append({k: np.asarray(arrays[k], np.float64)
                         for k in st.AXES if k in arrays.files})
    arrays = {k: np.stack([a[k] for a in per_step]) for k in per_step[0]}
    agreement_path = os.path.join(eval_dir, name, evaluate.STREAM_AGREEMENT_FILE)
    if os.path.exists(agreement_path):
      with open(agreement_path) as f:
        bins = json.load(f)["bins"]
      if bins:
        # The last bin starts at the last batch and may hold fewer pairs: every bin
        # keeps its first `size` pairs, so one resample of pair indices fits all.
        size = min(len(b["agreement_values"]) for b in bins)
        arrays["stream_agreement"] = np.asarray([b["agreement_values"][:size] for b in bins])
    runs.append(st.Run(name=name, method=info["method"], seed=int(info["seed"]),
                       steps=np.asarray([r["step"] for r in rows]), arrays=arrays))
  return runs, described




@dataclasses.dataclass(frozen=True)
class Claim:
  key: str
  paper: str  # what the paper says, and where
  statistic: str  # what is computed, in words
  kind: str  # 'greater', 'less' or 'similar' (statistics.verdict)
  methods: tuple  # methods the statistic needs
  fn: Callable[[dict], Optional[float]]


def _curves(groups, method, field="wins"):
  return [r.curve(field) for r in groups.get(method, [])]


def matched(a, b, field="wins"):
  return lambda g: st.matched_difference(_curves(g, a, field), _curves(g, b, field))


def peak(a, b, field="wins"):
  def fn(g):
    if not g.get(a) or not g.get(b):
      return None
    return (max(float(np.max(r.means[field])) for r in g[a])
            - max(float(np.max(r.means[field])) for r in g[b]))
  return fn


def over_optimisation(a, field="wins"):
  def fn(g):
    if not g.get(a):
      return None
    return float(np.mean([np.max(r.means[field]) - r.means[field][-1] for r in g[a]]))
  return fn


def final_mean(a, field):
  def fn(g):
    if not g.get(a) or field not in g[a][0].means:
      return None
    return float(np.mean([r.means[field][-1] for r in g[a]]))
  return fn


def final_difference(a, b, field):
  fa, fb = final_mean(a, field), final_mean(b, field)
  return lambda g: None if fa(g) is None or fb(g) is None else fa(g) - fb(g)


def quantile_ratio(a, baseline, q=0.9):
  def fn(g):
    if not g.get(a) or not g.get(baseline):
      return None
    qa = np.quantile(np.concatenate([r.means["wins"] for r in g[a]]), q)
    qb = np.quantile(np.concatenate([r.means["wins"] for r in g[baseline]]), q)
    return float(qa / qb - 1) if qb > 0 else None
  return fn


def stream_decay(a):
  def fn(g):
    runs = [r for r in g.get(a, []) if "stream_agreement" in r.means]
    if not runs:
      return None
    return float(np.mean([r.means["stream_agreement"][-1] - r.means["stream_agreement"][0]
                          for r in runs]))
  return fn


def proxy_over_policies(online="online", others=("online", "offline")):
  def fn(g):
    runs = [r for r in g.get(online, []) if "stream_agreement" in r.means]
    finals = [final_mean(m, "online_correct")(g) for m in others]
    if not runs or any(f is None for f in finals):
      return None
    return float(np.mean([np.mean(r.means["stream_agreement"]) for r in runs]) - max(finals))
  return fn


def drift_of_all(methods):
  def fn(g):
    values = [final_mean(m, "d_golden_drift_winner")(g) for m in methods if g.get(m)]
    return max(values) if values else None
  return fn


def claims(methods: set, *, oracle: bool) -> list[Claim]:
  """The claims a study with these methods covers, in the report's order."""
  out = [
      Claim("matched_kl", "At matched KL online beats offline (Fig. 1)",
            "mean(E_online - E_offline) over the shared log-KL range", "greater",
            ("online", "offline"), matched("online", "offline")),
      Claim("peak", "Online's peak win rate is higher than offline's (Fig. 1)",
            "best checkpoint win rate, online - offline", "greater", ("online", "offline"),
            peak("online", "offline")),
      Claim("overopt_online", "Online over-optimises: win rate rises, then falls (Fig. 1)",
            "mean over online runs of best - final win rate", "greater", ("online",),
            over_optimisation("online")),
      Claim("overopt_offline", "Offline over-optimises as well (Fig. 1)",
            "mean over offline runs of best - final win rate", "greater", ("offline",),
            over_optimisation("offline")),
      Claim("quantile", "Offline's best performance is below online's (Fig. 11, 90% quantile)",
            "q90(offline win rates) / q90(online win rates) - 1", "less", ("online", "offline"),
            quantile_ratio("offline", "online")),
      Claim("tandem_online", "Tandem (offline on D_online, shuffled) stays below online (Fig. 4)",
            "mean(E_online - E_tandem) over the shared log-KL range", "greater",
            ("online", "tandem"), matched("online", "tandem")),
      Claim("tandem_offline", "Tandem gains little over offline (Fig. 4)",
            "mean(E_tandem - E_offline) over the shared log-KL range", "similar",
            ("tandem", "offline"), matched("tandem", "offline")),
      Claim("classify", "Offline policies classify D_golden better than online ones (Fig. 7-8)",
            "final D_golden accuracy, offline - online", "greater", ("online", "offline"),
            final_difference("offline", "online", "d_golden_correct")),
      Claim("online_below_half", "Online's D_golden accuracy stays below 50% (Fig. 8)",
            "final D_golden accuracy of online - 0.5", "less", ("online",),
            lambda g: None if final_mean("online", "d_golden_correct")(g) is None
            else final_mean("online", "d_golden_correct")(g) - 0.5),
      Claim("drift_all", "log pi(y_w) - log pi_sft(y_w) falls for every method (Fig. 8)",
            "largest final drift of y_w over online, offline and tandem [nats]", "less",
            ("online", "offline"), drift_of_all(("online", "offline", "tandem"))),
      Claim("drift_offline_most", "... and falls most for offline (Fig. 8)",
            "final drift of y_w, offline - online [nats]", "less", ("online", "offline"),
            final_difference("offline", "online", "d_golden_drift_winner")),
      Claim("proxy_decays", "The proxy PM's accuracy on online samples decays over training "
            "(Fig. 6)", "proxy-golden agreement on the online stream, last bin - first bin",
            "less", ("online",), stream_decay("online")),
      Claim("proxy_best", "The proxy PM classifies online pairs better than the policies (Fig. 6)",
            "proxy-golden agreement on the stream - best final policy accuracy on online pairs",
            "greater", ("online", "offline"), proxy_over_policies()),
      Claim("bo2_gap", "Best-of-2: online beats offline at matched KL (Fig. 9)",
            "mean(E_bo2_online - E_bo2_offline) over the shared log-KL range", "greater",
            ("bo2_online", "bo2_offline"), matched("bo2_online", "bo2_offline")),
      Claim("bo2_tandem", "Best-of-2 offline on D_online-shuffled matches online (Fig. 9)",
            "mean(E_bo2_tandem - E_bo2_online) over the shared log-KL range", "similar",
            ("bo2_online", "bo2_tandem"), matched("bo2_tandem", "bo2_online"))]
  windows = sorted((int(m.split("_")[1]), m) for m in methods if re.fullmatch(r"window_\d+", m))
  if windows:
    out.append(Claim("window_small", f"A little shuffling is harmless (Fig. 13, window "
                     f"{windows[0][0]})", f"mean(E_{windows[0][1]} - E_online seed run) over "
                     "the shared log-KL range", "similar", (windows[0][1], "online_replayed"),
                     matched(windows[0][1], "online_replayed")))
  if len(windows) > 1:
    out.append(Claim("window_large", f"Shuffling more hurts (Fig. 13, window {windows[-1][0]})",
                     f"mean(E_online seed run - E_{windows[-1][1]}) over the shared log-KL "
                     "range", "greater", (windows[-1][1], "online_replayed"),
                     matched("online_replayed", windows[-1][1])))
  fixed = sorted(m for m in methods if m.startswith("fixed_"))
  same = [m for m in fixed if re.fullmatch(r"fixed_(\d+)_vs_\1", m)]
  early = [m for m in fixed if m.startswith("fixed_sft_vs_")]
  late = [m for m in fixed if m not in same and m not in early]
  if same:
    out.append(Claim("d4k", "D_4k-vs-4k stays below offline on D_golden (Fig. 5)",
                     f"mean(E_{same[0]} - E_offline) over the shared log-KL range", "less",
                     (same[0], "offline"), matched(same[0], "offline")))
  if early and late:
    out.append(Claim("d_sft_800", "D_sft-vs-800 beats D_800-vs-4k (Fig. 12)",
                     f"mean(E_{early[0]} - E_{late[0]}) over the shared log-KL range", "greater",
                     (early[0], late[0]), matched(early[0], late[0])))
  if oracle:
    out += [
        Claim("matched_kl_oracle", "At matched KL online beats offline: oracle judge (validity)",
              "as matched_kl, with the oracle's win rate", "greater", ("online", "offline"),
              matched("online", "offline", "oracle_wins")),
        Claim("bo2_gap_oracle", "Best-of-2 online beats offline: oracle judge (validity)",
              "as bo2_gap, with the oracle's win rate", "greater", ("bo2_online", "bo2_offline"),
              matched("bo2_online", "bo2_offline", "oracle_wins"))]
  return out


def evaluate_claims(runs: list[st.Run], described: dict, *, oracle: bool,
                    num_resamples: int = 1000, seed: int = 0) -> list[dict]:
  """Every covered claim's statistic, 95% interval and verdict, in order."""
  runs = with_replayed_source(runs, described)
  methods = {r.method for r in runs}
  rows = []
  for claim in claims(methods, oracle=oracle):
    row = {"key": claim.key, "paper": claim.paper, "statistic": claim.statistic,
           "kind": claim.kind}
    if not set(claim.methods) <= methods:
      row.update(value=None, interval=None, verdict="not run",
                 note="needs " + ", ".join(sorted(set(claim.methods) - methods)))
    else:
      used = [r for r in runs if r.method in claim.methods]
      result = st.bootstrap(claim.fn, used, num_resamples=num_resamples, seed=seed)
      row.update(value=result["value"], interval=result["interval"],
                 verdict=st.verdict(claim.kind, result["value"], result["interval"]),
                 note=f"{result['replicates']}/{result['resamples']} replicates defined; "
                      f"seeds {sorted({r.seed for r in used})}")
    rows.append(row)
  exact = sanity_check(runs, described)
  if exact is not None:
    rows.insert(7, exact)
  return rows


def with_replayed_source(runs, described) -> list[st.Run]:
  """``runs`` plus, as method ``online_replayed``, the online run the variants replay.

  The variants (sanity replay, windows) replay one online run (the baseline of
  the first seed); comparisons with them use that run.
  """
  runs = list(runs)
  replayed = [r for r in runs if described[r.name].get("method") == "sanity_replay"]
  if replayed:
    runs += [dataclasses.replace(r, method="online_replayed") for r in runs
             if r.method == "online" and _is_replayed(described, r.name, replayed[0].name)]
  return runs


def _is_replayed(described, online_name, replay_name) -> bool:
  online, replay = described[online_name], described[replay_name]
  return (online["seed"] == replay["seed"] and online["learning_rate"] == replay["learning_rate"]
          and online["beta"] == replay["beta"])


def sanity_check(runs, described) -> Optional[dict]:
  """App. F: the unshuffled replay of the online stream gives the online run, exactly."""
  replay = [r for r in runs if r.method == "sanity_replay"]
  source = [r for r in runs if r.method == "online_replayed"]
  if not replay or not source:
    return None
  a, b = replay[0], source[0]
  same_steps = np.array_equal(a.steps, b.steps)
  gap = (max(float(np.max(np.abs(a.arrays[k] - b.arrays[k]))) for k in ("wins", "kl_values"))
         if same_steps else None)
  return {"key": "sanity_replay", "paper": "Offline IPO on the unshuffled D_online reproduces "
          "online (App. F)", "statistic": "largest |difference| of per-prompt wins and KL at "
          "every checkpoint, replay vs its online run", "kind": "exact", "value": gap,
          "interval": None, "verdict": st.REPRODUCED if gap == 0 else st.NOT_REPRODUCED,
          "note": "exact comparison, no interval"}
