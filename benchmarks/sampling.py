"""Sampling throughput: ``t5align.sampling.sample`` vs Hugging Face PyTorch ``generate``.

Commands (from the repository root; results go to docs/benchmarks.md):

  # all cores: torch threads = cores; JAX one CPU device per core, batch split
  PYTHONPATH=. .venv/bin/python benchmarks/sampling.py
  # both pinned to one core (steadier on a shared machine)
  PYTHONPATH=. taskset -c 0 .venv/bin/python benchmarks/sampling.py

Both sides run the same randomly initialised T5 v1.1 network (t5-small-like
dimensions, float32) on this machine's CPU, in one process: a Hugging Face
``T5ForConditionalGeneration`` is built with its own random init and its state
dict is converted to our tree with ``t5align.models.hf_checkpoint``; a
teacher-forced logits comparison checks that both sides compute the same
function before anything is timed. Both sample at temperature 1 from the full
softmax (HF ``do_sample=True, top_k=0, top_p=1``) and are forced to produce
exactly ``--response_length`` tokens per row (EOS suppressed: HF
``min_new_tokens``, ours ``min_decode_length``), so tokens/s compares equal
work. Times are wall-clock for one whole call (encoder included) after a
warm-up call of the same shape, best of ``--repeats``; our compile time (JAX's
own trace + lowering + XLA compile durations of the first call) is reported
separately. Process CPU seconds (all threads) are printed too: on a shared
machine they are the steadier number.

On a GPU machine, ``--torch_device=cuda`` runs HF on the GPU too (JAX uses its
default backend); both then compute float32 matrix products in full float32
(JAX ``jax_default_matmul_precision=highest``, torch without TF32), and HF
timings synchronise the device before the clock stops.
"""

import argparse
import os
import platform
import time

# On a machine shared with other jobs, OpenMP threads that spin while waiting
# make torch with 2 threads on 2 cores 10-30x slower (16 tokens: 12 s instead
# of 0.4 s); passive waiting removes that artefact. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# XLA:CPU (jax 0.10) runs this program on one core per device, so "all cores"
# for JAX means one CPU device per core with the batch split over them (data
# parallel, as on an accelerator mesh); torch uses one thread per core.
# Must precede `import jax`; an explicit XLA_FLAGS wins.
CORES = len(os.sched_getaffinity(0))  # honours `taskset`
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={CORES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from t5align import partitioning  # noqa: E402
from t5align import sampling  # noqa: E402
from t5align.models import hf_checkpoint  # noqa: E402
from t5align.models import t5  # noqa: E402


def _hf_model(args) -> transformers.T5ForConditionalGeneration:
  # transformers 5.x ties a fresh model's lm_head to the embedding whatever
  # tie_word_embeddings says (without the T5 1.0 output scaling); the converted
  # tree then holds two equal arrays, which is the same function either way.
  config = transformers.T5Config(
      vocab_size=args.vocab_size, d_model=args.emb_dim, d_kv=args.head_dim,
      d_ff=args.mlp_dim, num_layers=args.num_layers, num_decoder_layers=args.num_layers,
      num_heads=args.num_heads, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
      layer_norm_epsilon=1e-6, tie_word_embeddings=False,
      decoder_start_token_id=t5.DECODER_START_ID, pad_token_id=t5.PAD_ID, eos_token_id=t5.EOS_ID)
  torch.manual_seed(args.seed)
  return transformers.T5ForConditionalGeneration(config).eval()


def _our_config(args) -> t5.T5Config:
  return t5.T5Config(vocab_size=args.vocab_size, emb_dim=args.emb_dim, num_heads=args.num_heads,
                     head_dim=args.head_dim, mlp_dim=args.mlp_dim,
                     num_encoder_layers=args.num_layers, num_decoder_layers=args.num_layers,
                     dtype="float32")


def _check_same_model(hf_model, params, config, args) -> float:
  """Max |logit difference| / max |logit| on a small teacher-forced batch."""
  rng = np.random.default_rng(args.seed)
  prompts = rng.integers(2, args.vocab_size, size=(2, 16))
  targets = jnp.asarray(rng.integers(2, args.vocab_size, size=(2, 8)))
  ours = np.asarray(t5.Transformer(config).apply(
      {"params": params}, jnp.asarray(prompts), t5.shift_right(targets), targets))
  decoder_inputs = torch.from_numpy(np.asarray(t5.shift_right(targets), np.int64))
  with torch.inference_mode():
    theirs = hf_model(input_ids=torch.from_numpy(prompts),
                      decoder_input_ids=decoder_inputs).logits.numpy()
  error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  if error > 1e-4:
    raise RuntimeError(f"HF and converted t5align models disagree: relative logit error {error}")
  return error


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds over all threads) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def _time_ours(params, config, prompts, args) -> tuple[tuple[float, float], float, int]:
  """((wall, cpu) of the best timed call, compile seconds, devices used)."""
  mesh = partitioning.make_mesh(data=-1)
  if len(prompts) % mesh.size:  # e.g. batch 1: one device
    mesh = partitioning.make_mesh(data=1)
  rules = partitioning.get_rules("data_parallel")
  params = jax.device_put(params, partitioning.replicated(mesh))
  prompts = jax.device_put(prompts, partitioning.batch_sharding(mesh))

  def run(seed):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      out = sampling.sample(params, prompts, config=config, rng=jax.random.key(seed),
                            max_decode_length=args.response_length,
                            min_decode_length=args.response_length, temperature=1.0)
    jax.block_until_ready(out)
    return out

  compile_events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **_: compile_events.append(seconds)
      if event.startswith("/jax/core/compile/") else None)
  out = run(0)
  assert int(out.num_steps) == args.response_length
  assert (np.asarray(out.lengths) == args.response_length).all()
  compile_s = sum(compile_events)  # tracing + lowering + XLA compilation of the first call
  jax.monitoring.clear_event_listeners()
  return min(_timed(lambda: run(i + 1)) for i in range(args.repeats)), compile_s, mesh.size


def _time_hf(hf_model, prompts, args) -> tuple[float, float]:
  input_ids = torch.from_numpy(np.asarray(prompts, np.int64)).to(args.torch_device)

  def run(new_tokens):
    with torch.inference_mode():
      out = hf_model.generate(
          input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
          temperature=1.0, top_k=0, top_p=1.0, num_beams=1, max_new_tokens=new_tokens,
          min_new_tokens=new_tokens, decoder_start_token_id=t5.DECODER_START_ID,
          pad_token_id=t5.PAD_ID, eos_token_id=t5.EOS_ID)
    if args.torch_device != "cpu":
      torch.cuda.synchronize()
    return out

  warm = run(args.response_length)  # lazy initialisation, allocator
  assert warm.shape == (len(prompts), args.response_length + 1)  # + decoder start token
  return min(_timed(lambda: run(args.response_length)) for _ in range(args.repeats))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_sizes", default="1,16,64")
  parser.add_argument("--prompt_length", type=int, default=128)
  parser.add_argument("--response_length", type=int, default=64)
  parser.add_argument("--vocab_size", type=int, default=32128)
  parser.add_argument("--emb_dim", type=int, default=512)
  parser.add_argument("--num_heads", type=int, default=6)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--mlp_dim", type=int, default=1024)
  parser.add_argument("--num_layers", type=int, default=8, help="encoder and decoder each")
  parser.add_argument("--repeats", type=int, default=1, help="timed calls per side; best kept")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--torch_threads", type=int, default=CORES,
                      help="torch intra-op threads (default: the cores this process may use)")
  parser.add_argument("--torch_device", default="cpu",
                      help="device of the HF model ('cuda' on a GPU machine)")
  args = parser.parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

  torch.set_num_threads(args.torch_threads)
  if jax.default_backend() != "cpu":  # compare full float32 with full float32 (no TF32)
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
  config = _our_config(args)
  print(f"model: T5 v1.1 random init, vocab {args.vocab_size}, emb {args.emb_dim}, "
        f"{args.num_heads} heads x {args.head_dim}, mlp {args.mlp_dim}, "
        f"{args.num_layers}+{args.num_layers} layers, float32, {t5.param_count(config) / 1e6:.1f}M "
        "params")
  print(f"prompt length {args.prompt_length}, response length {args.response_length} (forced), "
        f"temperature 1, full softmax, best of {args.repeats} timed call(s) after a warm-up")
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"({CORES} usable), "
        f"{jax.device_count()} JAX {jax.devices()[0].device_kind} device(s), "
        f"torch on {args.torch_device}, "
        f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"versions: jax {jax.__version__}, flax {__import__('flax').__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}")

  hf_model = _hf_model(args)
  params = hf_checkpoint.from_hf_state_dict(
      {k: v.numpy() for k, v in hf_model.state_dict().items()}, config,
      scale_decoder_outputs=bool(getattr(hf_model.config, "scale_decoder_outputs", False)))
  params = jax.tree.map(jnp.asarray, params)
  print(f"converted HF -> t5align; relative logit difference "
        f"{_check_same_model(hf_model, params, config, args):.1e}")
  hf_model.to(args.torch_device)

  rows = []
  for batch in batch_sizes:
    prompts = np.random.default_rng(batch).integers(2, args.vocab_size,
                                                    size=(batch, args.prompt_length))
    (ours, ours_cpu), compile_s, devices = _time_ours(
        params, config, np.asarray(prompts, np.int32), args)
    theirs, theirs_cpu = _time_hf(hf_model, prompts, args)
    tokens = batch * args.response_length
    rows.append((batch, devices, tokens / ours, tokens / theirs, theirs / ours, ours_cpu,
                 theirs_cpu, compile_s))
    print(f"batch {batch}: ours {ours:.2f} s (cpu {ours_cpu:.2f} s, {devices} device(s)), "
          f"HF {theirs:.2f} s (cpu {theirs_cpu:.2f} s), our compile {compile_s:.1f} s, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

  print("\n| batch | t5align tok/s (devices) | HF generate tok/s | ratio (ours/HF) "
        "| CPU s ours / HF | our compile (s) |")
  print("|---:|---:|---:|---:|---:|---:|")
  for batch, devices, ours, theirs, ratio, ours_cpu, theirs_cpu, compile_s in rows:
    print(f"| {batch} | {ours:.0f} ({devices}) | {theirs:.0f} | {ratio:.2f} | {ours_cpu:.1f} / "
          f"{theirs_cpu:.1f} | {compile_s:.1f} |")


if __name__ == "__main__":
  main()
