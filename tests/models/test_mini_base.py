"""The miniature world's pretrained bases: task mixture, pretraining loop, shipped files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5align import sampling
from t5align.data import mini_world
from t5align.data import vocab as vocab_lib
from t5align.models import load
from t5align.models import mini_base
from t5align.models import t5


def _split(text, prefix):
  assert text.startswith(prefix + ": ")
  return [part.split() for part in text[len(prefix) + 2:].split(" | ")]


@pytest.mark.parametrize("task", mini_base.TASKS)
def test_pretraining_targets_follow_their_definition(task):
  rng = np.random.default_rng(3)
  for _ in range(200):
    source, target = mini_base.pretraining_example(rng, task)
    parts = _split(source, task)
    words = set(mini_world.NOUNS + mini_world.MODIFIERS + mini_world.FILLERS)
    assert all(set(p) <= words for p in parts)  # generic strings: no summaries, no prompts
    if task == "copy":
      assert target.split() == parts[0]
    elif task == "shared":
      a, b = parts
      assert target.split() == [w for w in b if w in a]
    elif task == "missing":
      a, b = parts
      assert target.split() == [w for w in a if w not in b]
    else:
      a, b = parts
      assert len(a) != len(b) and target == ("1" if len(a) > len(b) else "2")


def test_tasks_are_mixed_and_fit_the_lengths():
  settings = mini_base.PretrainingSettings(batch_size=256)
  vocabulary = vocab_lib.get_vocabulary()
  inputs, targets = mini_base.pretraining_batch(np.random.default_rng(0), vocabulary, settings)
  assert inputs.shape == (256, 64) and targets.shape == (256, 24)
  # Every row ends with EOS inside the window (nothing truncated at these lengths).
  assert all(t5.EOS_ID in row for row in inputs) and all(t5.EOS_ID in row for row in targets)
  tasks = {vocabulary.decode([int(t) for t in row if t > 1]).split(":")[0] for row in inputs}
  assert tasks == set(mini_base.TASKS)


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="unknown mini base size 'huge'"):
    mini_base.checkpoint_path("huge")
  with pytest.raises(ValueError, match="unknown pretraining task"):
    mini_base.pretraining_example(np.random.default_rng(0), "translate")


def test_pretraining_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
  micro = mini_base._config(16, 1, 1)
  monkeypatch.setitem(mini_base.SIZES, "micro", micro)
  logs = []
  settings = mini_base.PretrainingSettings(steps=60, batch_size=16, warmup_steps=5,
                                           learning_rate=3e-3)
  params, metrics = mini_base.pretrain(micro, settings, log_every=20, log=logs.append)
  first = float(logs[0].split("token loss ")[1].split()[0])
  assert metrics["token_loss"] < first - 0.5, logs
  out = mini_base.build("micro", str(tmp_path / "micro"),
                        mini_base.PretrainingSettings(steps=2, batch_size=4, warmup_steps=1))
  config, loaded = load.load_pretrained(out)
  assert (config.emb_dim, config.relative_attention_max_distance) == (16, 64)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)


def _exact_match_rates(config, params, per_task=48, seed=123):
  """Greedy exact-match rate per task on fresh examples (pretraining used seed 0)."""
  vocabulary = vocab_lib.get_vocabulary()
  settings = mini_base.PretrainingSettings()
  rng = np.random.default_rng(seed)
  rates = {}
  for task in mini_base.TASKS:
    cases = [mini_base.pretraining_example(rng, task) for _ in range(per_task)]
    inputs = np.zeros((per_task, settings.input_length), np.int32)
    for i, (source, _) in enumerate(cases):
      ids = list(vocabulary.encode(source)) + [t5.EOS_ID]
      inputs[i, :len(ids)] = ids
    out = sampling.sample(params, jnp.asarray(inputs), config=config, rng=jax.random.key(0),
                          max_decode_length=settings.target_length, temperature=0.0)
    got = [vocabulary.decode([int(t) for t in row[:n] if t != t5.EOS_ID])
           for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]
    rates[task] = np.mean([g == want for g, (_, want) in zip(got, cases)])
  return rates


@pytest.mark.parametrize("size,set_ops", [("small", 0.3), ("large", 0.8)])
def test_shipped_bases_are_pretrained(size, set_ops):
  """They copy, intersect and compare unseen strings; a random network of the size does not."""
  config, params = load.load_pretrained(mini_base.checkpoint_path(size), dtype="float32")
  rates = _exact_match_rates(config, params)
  print(size, rates)
  assert rates["copy"] >= 0.9 and rates["more"] >= 0.9, rates
  # Measured at shipping: small 0.50 / 0.44, large 0.94 / 1.00 (shared / missing).
  assert rates["shared"] >= set_ops and rates["missing"] >= set_ops, rates
  untrained = _exact_match_rates(config, t5.init_params(config, jax.random.key(0)))
  assert max(untrained[t] for t in ("copy", "shared", "missing")) <= 0.1, untrained
