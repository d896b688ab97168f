"""Pretrained base checkpoints for the miniature world: its stand-in for T5 v1.1.

The paper starts every model from a pretrained T5 checkpoint; its preference
models and policies inherit from pretraining the skills that make a few
thousand fine-tuning steps enough (reading a text against another, copying from
the input). Tiny T5s trained from scratch on the miniature world lack them: a
pairwise preference model stays at chance for thousands of steps, and the SFT
policy does not learn to copy from the post within the study's budget
(docs/mini_world.md, "Pretrained bases").

So the miniature world ships two pretrained sizes, ``small`` (policy and proxy
PM, as the paper's Large) and ``large`` (golden PM, as the paper's XXL), in
Hugging Face format under ``t5align/models/assets/``, loaded with the same code
as a real checkpoint. They were pretrained on a mixture of *generic* text tasks
over random strings of the mini lexicon, none of which is a summary, a
preference or the oracle (no pretraining task reads ``mini_world.oracle_*`` or
the posts' grammar):

  copy: A         ->  A
  shared: A | B   ->  the words of B that occur in A, in B's order
  missing: A | B  ->  the words of A that do not occur in B, in A's order
  more: A | B     ->  1 if A has more words than B, else 2

(Adding two three-text comparison tasks, "which of A, B shares more words with
C", left the large base at 0.89 token accuracy after the same steps and its
golden PM 0.59 on validation labels after 800 steps, against 0.69 from the
four-task base; see docs/mini_world.md.)

Rebuild (one CPU core, about 6 and 15 minutes):

  python -m t5align.models.mini_base --size=small
  python -m t5align.models.mini_base --size=large

Pretraining runs on the CPU in float32 with a fixed seed, but XLA's CPU kernels
are not guaranteed bit-identical across machines, so a rebuild is close to, not
byte-equal to, the shipped files. Changing the mini vocabulary changes token
ids: rebuild both bases afterwards.
"""

import argparse
import dataclasses
import functools
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5align import losses
from t5align.data import mini_world
from t5align.data import vocab as vocab_lib
from t5align.models import hf_checkpoint
from t5align.models import t5
from t5align.train import optimizers

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")


def _config(emb_dim: int, encoder_layers: int, decoder_layers: int) -> t5.T5Config:
  return t5.T5Config(
      vocab_size=vocab_lib.MINI_VOCAB_SIZE, emb_dim=emb_dim, num_heads=4, head_dim=emb_dim // 4,
      mlp_dim=2 * emb_dim, num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers,
      relative_attention_num_buckets=32, relative_attention_max_distance=64,
      dropout_rate=0.0, dtype="float32")


# Must match gin/models/mini/{policy,golden_pm}.gin.
SIZES = {"small": _config(64, 2, 2), "large": _config(96, 3, 2)}

TASKS = ("copy", "shared", "missing", "more")
_WORDS = mini_world.NOUNS + mini_world.MODIFIERS + mini_world.FILLERS


@dataclasses.dataclass(frozen=True)
class PretrainingSettings:
  steps: int = 3000
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 200
  input_length: int = 64
  target_length: int = 24
  seed: int = 0


def checkpoint_path(size: str) -> str:
  """The shipped base checkpoint directory of ``size`` ('small' or 'large')."""
  if size not in SIZES:
    raise ValueError(f"unknown mini base size {size!r}; expected one of {sorted(SIZES)}")
  return os.path.join(ASSETS_DIR, f"mini_base_{size}")


def _text(rng: np.random.Generator) -> list[str]:
  return [_WORDS[int(rng.integers(len(_WORDS)))] for _ in range(2 + int(rng.integers(12)))]


def _borrow(rng: np.random.Generator, words: list[str], source: list[str],
            rate: float) -> list[str]:
  """``words`` with each word replaced, with probability ``rate``, by a word of ``source``."""
  return [source[int(rng.integers(len(source)))] if rng.random() < rate else w for w in words]


def pretraining_example(rng: np.random.Generator, task: str) -> tuple[str, str]:
  """One (input text, target text) of a pretraining task (see the module docstring)."""
  a, b = _text(rng), _text(rng)
  join = " ".join
  if task == "copy":
    return f"copy: {join(a)}", join(a)
  if task in ("shared", "missing"):
    if rng.random() < 0.5:  # overlapping texts half of the time
      b = _borrow(rng, b, a, 0.5)
    if task == "shared":
      return f"shared: {join(a)} | {join(b)}", join(w for w in b if w in a)
    return f"missing: {join(a)} | {join(b)}", join(w for w in a if w not in b)
  if task == "more":
    while len(a) == len(b):
      b = _text(rng)
    return f"more: {join(a)} | {join(b)}", "1" if len(a) > len(b) else "2"
  raise ValueError(f"unknown pretraining task {task!r}; expected one of {TASKS}")


def pretraining_batch(rng: np.random.Generator, vocabulary,
                      settings: PretrainingSettings) -> tuple[np.ndarray, np.ndarray]:
  """Token arrays (inputs, targets), EOS-terminated and zero-padded, tasks mixed uniformly."""
  n = settings.batch_size
  inputs = np.zeros((n, settings.input_length), np.int32)
  targets = np.zeros((n, settings.target_length), np.int32)
  for i in range(n):
    source, target = pretraining_example(rng, TASKS[int(rng.integers(len(TASKS)))])
    x = list(vocabulary.encode(source))[:settings.input_length - 1] + [t5.EOS_ID]
    y = list(vocabulary.encode(target))[:settings.target_length - 1] + [t5.EOS_ID]
    inputs[i, :len(x)] = x
    targets[i, :len(y)] = y
  return inputs, targets


def pretrain(config: t5.T5Config, settings: PretrainingSettings = PretrainingSettings(), *,
             log_every: int = 250, log=functools.partial(print, flush=True)):
  """Trains ``config`` from scratch on the task mixture; returns (params, last-window metrics)."""
  vocabulary = vocab_lib.get_vocabulary()
  model = t5.Transformer(config)
  params = t5.init_params(config, jax.random.key(settings.seed))
  optimizer = optimizers.make_optimizer(
      name="adamw", learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
      decay="cosine", total_steps=settings.steps, final_learning_rate=0.1 * settings.learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, inputs, targets):
    def loss_fn(params):
      logits = model.apply({"params": params}, inputs, t5.shift_right(targets), targets)
      mask = (targets > 0).astype(jnp.float32)
      token = losses.sft_token_loss(logits, targets, mask, z_loss=0.0)
      correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
      return token.loss_sum / token.token_count, jnp.sum(correct * mask) / token.token_count
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  rng = np.random.default_rng(settings.seed)
  window, start = [], time.time()
  for i in range(1, settings.steps + 1):
    params, opt_state, loss, accuracy = step(params, opt_state,
                                             *pretraining_batch(rng, vocabulary, settings))
    window.append((float(loss), float(accuracy)))
    if i % log_every == 0 or i == settings.steps:
      loss_mean, acc_mean = np.mean(window, axis=0)
      log(f"step {i}/{settings.steps}  token loss {loss_mean:.3f}  token accuracy "
          f"{acc_mean:.3f}  ({time.time() - start:.0f}s)")
      metrics = {"token_loss": float(loss_mean), "token_accuracy": float(acc_mean)}
      window = []
  return jax.device_get(params), metrics


def build(size: str, output: Optional[str] = None,
          settings: PretrainingSettings = PretrainingSettings()) -> str:
  """Pretrains base ``size`` and writes it in Hugging Face format; returns the directory."""
  output = output or checkpoint_path(size)
  params, _ = pretrain(SIZES[size], settings)
  hf_checkpoint.save_hf_checkpoint(output, params, SIZES[size])
  return output


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), required=True)
  parser.add_argument("--output", help="directory (default: the shipped asset)")
  parser.add_argument("--steps", type=int, default=PretrainingSettings.steps)
  args = parser.parse_args(argv)
  print(f"wrote {build(args.size, args.output, PretrainingSettings(steps=args.steps))}")


if __name__ == "__main__":
  main()
