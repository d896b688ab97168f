"""Train-step throughput, and where an online step spends its time.

    python benchmarks/train_step.py [--size mini|small|base|large] [--batch 16] [--repeats 5]
        [--dtype float32|bfloat16] [--prompt_len 64] [--response_len 16]

Times, after a first call (reported separately: it includes compilation, except for the
parts first called to build the inputs of the next, sampling and reference scoring):
  * the SFT step and the alignment step (examples/s);
  * the parts of one online IPO step, each jitted on its own: sampling two
    responses per prompt, labelling both orders with the PM, scoring the
    reference, and the update; plus the fused ``online_pairs`` function.
Prints a table with each part's share of the online step.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5align import sampling
from t5align.models import preference
from t5align.models import t5
from t5align.train import pair_sources
from t5align.train import state as state_lib
from t5align.train import steps

SIZES = {
    "mini": t5.T5Config(vocab_size=320, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                        num_encoder_layers=2, num_decoder_layers=2, dtype="float32"),
    **{name: t5.T5_1_1_SIZES[name] for name in ("small", "base", "large")},
}


def _time(fn, repeats):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--size", default="mini", choices=sorted(SIZES))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--response_len", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", help="activation dtype (bfloat16 on GPU/TPU)")
  args = parser.parse_args()
  cfg = dataclasses.replace(SIZES[args.size], dtype=args.dtype)
  b, p_len, r_len = args.batch, args.prompt_len, args.response_len
  pm_len = p_len + 2 * r_len + 8
  rng = np.random.default_rng(0)
  params = t5.init_params(cfg, jax.random.key(0))
  pm_params = t5.init_params(cfg, jax.random.key(1))
  fmt = preference.PairFormat((5,), (6,), 7, 8)
  prompt = jnp.asarray(np.concatenate([rng.integers(3, cfg.vocab_size, (b, p_len - 1)),
                                       np.ones((b, 1))], 1), jnp.int32)
  tx = optax.adafactor(1e-4)
  state = state_lib.TrainState.create(params=params, tx=tx, rng=jax.random.key(0))
  settings = pair_sources.OnlineSettings(policy_config=cfg, pm_config=cfg, pair_format=fmt,
                                         pm_input_length=pm_len, max_decode_length=r_len)
  key = jax.random.key(2)

  sample = jax.jit(lambda prm, x, k: sampling.sample(prm, x, config=cfg, rng=k, num_samples=2,
                                                      max_decode_length=r_len,
                                                      min_decode_length=r_len).tokens)
  tokens = sample(params, prompt, key)
  y1, y2 = tokens[0::2], tokens[1::2]
  label = jax.jit(lambda prm, x, a, c: preference.symmetric_preference(
      prm, cfg, fmt, x, a, c, pm_len)["margin"])
  score = jax.jit(lambda prm, x, a, c: pair_sources._reference_logprobs(  # pylint: disable=protected-access
      prm, x, a, c, config=cfg, reduction="sum"))
  ref_c, ref_r = score(params, prompt, y1, y2)
  batch = {"prompt": prompt, "chosen": y1, "rejected": y2, "label": jnp.ones((b,)),
           "ref_chosen": ref_c, "ref_rejected": ref_r}
  align = jax.jit(steps.make_align_step(cfg, tx, steps.AlignLoss()))
  sft = jax.jit(steps.make_sft_step(cfg, tx, enable_dropout=False))
  fused = lambda: pair_sources.online_pairs(params, params, pm_params, prompt, key,
                                            settings=settings)["chosen"]

  rows = {
      "sample (2 per prompt)": _time(lambda: sample(params, prompt, key), args.repeats),
      "label (PM, both orders)": _time(lambda: label(pm_params, prompt, y1, y2), args.repeats),
      "reference scoring": _time(lambda: score(params, prompt, y1, y2), args.repeats),
      "update (align step)": _time(lambda: align(state, batch)[1]["loss"], args.repeats),
  }
  online_total = sum(t for t, _ in rows.values())
  fused_t, fused_c = _time(fused, args.repeats)
  sft_t, sft_c = _time(lambda: sft(state, {"inputs": prompt, "targets": y1})[1]["loss"],
                       args.repeats)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  size: {args.size}  "
        f"batch: {b}  prompt: {p_len}  response: {r_len}  dtype: {args.dtype}  "
        f"jax {jax.__version__}")
  print(f"{'part':<28}{'ms':>10}{'share':>9}{'first call s':>11}")
  for name, (t, c) in rows.items():
    print(f"{name:<28}{t * 1e3:>10.1f}{t / online_total:>9.1%}{c:>11.1f}")
  print(f"{'online step (sum of parts)':<28}{online_total * 1e3:>10.1f}{'':>9}")
  print(f"{'online pairs, fused jit':<28}{fused_t * 1e3:>10.1f}{'':>9}{fused_c:>11.1f}")
  print(f"{'sft step':<28}{sft_t * 1e3:>10.1f}{'':>9}{sft_c:>11.1f}")
  print(f"throughput: align {b / rows['update (align step)'][0]:.1f} pairs/s, "
        f"sft {b / sft_t:.1f} sequences/s, online {b / online_total:.1f} pairs/s")


if __name__ == "__main__":
  main()
