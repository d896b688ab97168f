"""Tests for t5align.losses against hand-computed values and finite differences.

Expected numbers are literals worked out by hand (or with plain Python `math`)
for the inputs below, never by calling the function under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5align import losses

# Two pairs. Delta = (pw - rw) - (pl - rl):
#   pair 0: (-10 + 11) - (-12 + 11.5) = 1.5
#   pair 1: (-3.5 + 4) - (-2 + 4.5) = -2.0
PW = [-10.0, -3.5]
PL = [-12.0, -2.0]
RW = [-11.0, -4.0]
RL = [-11.5, -4.5]
DELTA = [1.5, -2.0]
BETA = 0.5  # IPO target margin 1/(2 beta) = 1
SOFT = [0.8, 0.3]


def _maybe_jit(fn, use_jit, **jit_kwargs):
  return jax.jit(fn, **jit_kwargs) if use_jit else fn


def _arrays(*values, dtype=jnp.float32):
  return [jnp.asarray(v, dtype) for v in values]


def _pair_kwargs(label=None):
  pw, pl, rw, rl = _arrays(PW, PL, RW, RL)
  kwargs = dict(policy_chosen=pw, policy_rejected=pl, ref_chosen=rw,
                ref_rejected=rl, beta=BETA)
  if label is not None:
    kwargs["label"] = jnp.asarray(label, jnp.float32)
  return kwargs


jit_modes = pytest.mark.parametrize("use_jit", [False, True],
                                    ids=["eager", "jit"])


# ---------------------------------------------------------------- token level


@jit_modes
def test_token_logprobs_hand_values(use_jit):
  logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
  targets = jnp.array([[2, 0]])
  got = _maybe_jit(losses.token_logprobs, use_jit)(logits, targets)
  # 3 - log(e + e^2 + e^3) and -log 3.
  np.testing.assert_allclose(got, [[-0.40760596444438, -1.0986122886681098]],
                             rtol=1e-6)
  assert got.dtype == jnp.float32


def test_token_logprobs_upcasts_bfloat16():
  logits = jnp.array([[[1.0, 2.0, 3.0]]], jnp.bfloat16)
  got = losses.token_logprobs(logits, jnp.array([[2]]))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [[-0.40760596444438]], rtol=1e-6)


@jit_modes
def test_sequence_logprob_sum_and_mean_on_padded_rows(use_jit):
  token_lp = jnp.array([[-1.0, -2.0, -3.0, 7.0], [-0.5, -1.5, 9.0, 9.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  seq = _maybe_jit(losses.sequence_logprob, use_jit,
                   static_argnames="reduction")
  np.testing.assert_allclose(
      seq(token_lp, mask, reduction="sum"), [-6.0, -2.0])
  np.testing.assert_allclose(
      seq(token_lp, mask, reduction=losses.Reduction.MEAN), [-2.0, -1.0])


def test_sequence_logprob_masks_nan_and_empty_rows():
  token_lp = jnp.array([[-1.0, jnp.nan], [jnp.inf, -jnp.inf]])
  mask = jnp.array([[True, False], [False, False]])
  np.testing.assert_array_equal(
      losses.sequence_logprob(token_lp, mask, reduction="sum"), [-1.0, 0.0])
  np.testing.assert_array_equal(
      losses.sequence_logprob(token_lp, mask, reduction="mean"), [-1.0, 0.0])


def test_sequence_logprob_reduction_is_validated():
  with pytest.raises(ValueError, match=r"reduction='avg'.*\('sum', 'mean'\)"):
    losses.sequence_logprob(jnp.zeros((1, 2)), jnp.ones((1, 2)),
                            reduction="avg")
  with pytest.raises(ValueError, match="shape"):
    losses.sequence_logprob(jnp.zeros((1, 2)), jnp.ones((1, 3)),
                            reduction="sum")


@jit_modes
def test_sft_token_loss_hand_values(use_jit):
  # A third, padded position holds garbage that must not count.
  logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [50.0, -50.0, 0.0]]])
  targets = jnp.array([[2, 0, 1]])
  weights = jnp.array([[1.0, 1.0, 0.0]])
  fn = _maybe_jit(lambda *a: losses.sft_token_loss(*a, z_loss=1e-4), use_jit)
  got = fn(logits, targets, weights)
  # nll = (lse1 - 3) + log 3; z = 1e-4 (lse1^2 + (log 3)^2), lse1 = 3.4076...
  np.testing.assert_allclose(got.loss_sum, 1.507500125849463, rtol=1e-6)
  np.testing.assert_allclose(got.z_loss_sum, 0.0012818727369729496, rtol=1e-6)
  assert float(got.token_count) == 2.0
  no_z = losses.sft_token_loss(logits, targets, weights, z_loss=0.0)
  np.testing.assert_allclose(no_z.loss_sum, 1.50621825311249, rtol=1e-6)
  assert float(no_z.z_loss_sum) == 0.0


# ----------------------------------------------------------------- pair losses


@jit_modes
def test_preference_margin(use_jit):
  fn = _maybe_jit(lambda **k: losses.preference_margin(**k), use_jit)
  kwargs = _pair_kwargs()
  del kwargs["beta"]
  np.testing.assert_allclose(fn(**kwargs), DELTA)


# (name, expected hard, expected with SOFT labels); see the module header for
# Delta = [1.5, -2] and beta = 0.5.
PAIR_CASES = [
    # (1.5 - 1)^2, (-2 - 1)^2; soft: .8*.25 + .2*(-1.5-1)^2, .3*9 + .7*(2-1)^2
    ("ipo", [0.25, 9.0], [1.45, 3.4]),
    # softplus(-.75), softplus(1); soft mixes softplus(-/+ beta Delta)
    ("dpo", [0.38687100611489994, 1.3132616875182228],
     [0.5368710061149, 0.6132616875182229]),
    # max(0, 1 - .75), max(0, 1 + 1); soft: .8*.25 + .2*1.75, .3*2 + .7*0
    ("slic", [0.25, 2.0], [0.55, 0.6]),
    # -pw; soft: -(.8*-10 + .2*-12), -(.3*-3.5 + .7*-2)
    ("best_of_2", [10.0, 3.5], [10.4, 2.45]),
]


@jit_modes
@pytest.mark.parametrize("name,hard,soft", PAIR_CASES,
                         ids=[c[0] for c in PAIR_CASES])
def test_pair_loss_hand_values(name, hard, soft, use_jit):
  fn = _maybe_jit(lambda **k: losses.pair_loss(name, **k), use_jit)
  np.testing.assert_allclose(fn(**_pair_kwargs()), hard, rtol=1e-6)
  np.testing.assert_allclose(fn(**_pair_kwargs(SOFT)), soft, rtol=1e-6)
  # p = 1 is the hard loss; p = 0 is the hard loss with the pair swapped.
  np.testing.assert_allclose(fn(**_pair_kwargs([1.0, 1.0])), hard, rtol=1e-6)
  swapped = _pair_kwargs()
  swapped.update(policy_chosen=swapped["policy_rejected"],
                 policy_rejected=swapped["policy_chosen"],
                 ref_chosen=swapped["ref_rejected"],
                 ref_rejected=swapped["ref_chosen"])
  np.testing.assert_allclose(fn(**_pair_kwargs([0.0, 0.0])), fn(**swapped),
                             rtol=1e-6)


@jit_modes
def test_direct_functions_match_dispatcher(use_jit):
  delta = jnp.asarray(DELTA)
  label = jnp.asarray(SOFT)
  direct = {
      "ipo": lambda d, p: losses.ipo_loss(d, beta=BETA, label=p),
      "dpo": lambda d, p: losses.dpo_loss(d, beta=BETA, label=p),
      "slic": lambda d, p: losses.slic_hinge_loss(d, beta=BETA, label=p),
  }
  for name, fn in direct.items():
    np.testing.assert_allclose(
        _maybe_jit(fn, use_jit)(delta, label),
        losses.pair_loss(name, **_pair_kwargs(SOFT)), rtol=1e-6)


@jit_modes
def test_ipo_conventions_differ_by_beta_squared(use_jit):
  delta = jnp.array([1.5, -2.0, 0.3, 7.0])
  for beta in (0.1, 0.5, 1.0):
    margin = _maybe_jit(
        lambda d, b=beta: losses.ipo_loss(d, beta=b, convention="margin"),
        use_jit)(delta)
    app_b = _maybe_jit(
        lambda d, b=beta: losses.ipo_loss(d, beta=b, convention="app_b"),
        use_jit)(delta)
    np.testing.assert_allclose(app_b, beta**2 * margin, rtol=1e-5)
  # Hand values for beta = 0.5: (0.75 - 0.5)^2 and (-1 - 0.5)^2.
  np.testing.assert_allclose(
      losses.ipo_loss(jnp.asarray(DELTA), beta=0.5, convention="app_b"),
      [0.0625, 2.25])
  # Same minimiser: Delta* = 1/(2 beta) = 5 zeroes both at beta = 0.1.
  at_target = jnp.array([5.0])
  for convention in losses.IPO_CONVENTIONS:
    assert float(losses.ipo_loss(at_target, beta=0.1,
                                 convention=convention)[0]) < 1e-10


def test_best_of_2_ignores_reference_and_beta():
  kwargs = _pair_kwargs()
  kwargs.update(ref_chosen=None, ref_rejected=None, beta=None)
  np.testing.assert_allclose(losses.pair_loss("best_of_2", **kwargs),
                             [10.0, 3.5])


def test_unknown_names_and_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"'sigmoid'.*'ipo', 'dpo', 'slic'"):
    losses.pair_loss("sigmoid", **_pair_kwargs())
  with pytest.raises(ValueError, match=r"convention='eq1'.*'margin', 'app_b'"):
    losses.ipo_loss(jnp.zeros(2), beta=0.1, convention="eq1")
  with pytest.raises(ValueError, match="needs ref_chosen"):
    losses.pair_loss("ipo", **dict(_pair_kwargs(), ref_chosen=None))
  with pytest.raises(ValueError, match="beta=0"):
    losses.ipo_loss(jnp.zeros(2), beta=0)
  # Unreduced token log-probs must not slip into a pair loss.
  with pytest.raises(ValueError,
                     match=r"policy_chosen must have shape \[batch\]"):
    losses.pair_loss("dpo", **dict(_pair_kwargs(),
                                   policy_chosen=jnp.zeros((2, 5))))
  with pytest.raises(ValueError, match="soft label needs policy_rejected"):
    losses.best_of_2_loss(jnp.zeros(2), label=jnp.ones(2))


@jit_modes
def test_pair_metrics_hand_values(use_jit):
  fn = _maybe_jit(lambda **k: losses.pair_metrics("ipo", **k), use_jit)
  got = fn(**_pair_kwargs())
  np.testing.assert_allclose(got["loss"], (0.25 + 9.0) / 2)
  np.testing.assert_allclose(got["delta_mean"], -0.25)
  np.testing.assert_allclose(got["accuracy"], 0.5)
  # beta * mean(pw - rw) = .5 * mean(1, .5);
  # beta * mean(pl - rl) = .5 * mean(-.5, 2.5)
  np.testing.assert_allclose(got["reward_chosen"], 0.375)
  np.testing.assert_allclose(got["reward_rejected"], 0.5)
  # Weights drop the second pair; a label of 0 turns Delta < 0 into a hit.
  weighted = losses.pair_metrics("ipo", weights=jnp.array([1.0, 0.0]),
                                 **_pair_kwargs())
  np.testing.assert_allclose(weighted["loss"], 0.25)
  np.testing.assert_allclose(weighted["delta_mean"], 1.5)
  labelled = losses.pair_metrics("ipo", **_pair_kwargs([1.0, 0.0]))
  np.testing.assert_allclose(labelled["accuracy"], 1.0)
  bo2 = losses.pair_metrics("best_of_2", **dict(
      _pair_kwargs(), ref_chosen=None, ref_rejected=None, beta=None))
  assert set(bo2) == {"loss"}


def test_batch_mean():
  values = jnp.array([1.0, 2.0, 6.0])
  np.testing.assert_allclose(losses.batch_mean(values), 3.0)
  np.testing.assert_allclose(
      losses.batch_mean(values, jnp.array([1.0, 3.0, 0.0])), 7.0 / 4.0)
  assert float(losses.batch_mean(values, jnp.zeros(3))) == 0.0


# ------------------------------------------------------------ preference models


@jit_modes
def test_pm_pairwise_loss_hand_values(use_jit):
  got = _maybe_jit(losses.pm_pairwise_loss, use_jit)(
      jnp.array([2.0, -1.0]), jnp.array([1.0, 0.25]))
  # softplus(-2); .25 softplus(1) + .75 softplus(-1)
  np.testing.assert_allclose(got, [0.1269280110429725, 0.5632616875182228],
                             rtol=1e-6)


@jit_modes
def test_bradley_terry_hand_values(use_jit):
  fn = _maybe_jit(losses.bradley_terry_loss, use_jit)
  rw, rl = jnp.array([1.0, 0.0]), jnp.array([0.5, 2.0])
  # softplus(-0.5), softplus(2)
  np.testing.assert_allclose(fn(rw, rl), [0.4740769841801067,
                                          2.1269280110429727], rtol=1e-6)
  np.testing.assert_allclose(fn(rw, rl, label=jnp.ones(2)), fn(rw, rl))
  np.testing.assert_allclose(
      fn(rw, rl, label=jnp.array([0.5, 0.0])),
      [0.5 * 0.4740769841801067 + 0.5 * (0.5 + 0.4740769841801067),
       2.1269280110429727 - 2.0], rtol=1e-6)


@jit_modes
def test_random_order_swap_flips_labels_and_pytrees(use_jit):
  batch = 512
  first = {"tokens": jnp.arange(batch * 3).reshape(batch, 3),
           "score": jnp.arange(batch, dtype=jnp.float32)}
  second = {"tokens": -jnp.arange(batch * 3).reshape(batch, 3) - 1,
            "score": -jnp.arange(batch, dtype=jnp.float32) - 1.0}
  label = jnp.full((batch,), 0.9)
  fn = _maybe_jit(losses.random_order_swap, use_jit)
  new_first, new_second, new_label, swapped = fn(
      jax.random.key(0), first, second, label)
  swapped = np.asarray(swapped)
  assert 0.4 < swapped.mean() < 0.6
  np.testing.assert_allclose(new_label, np.where(swapped, 0.1, 0.9), rtol=1e-6)
  for key in first:
    cond = swapped.reshape((batch,) + (1,) * (first[key].ndim - 1))
    np.testing.assert_array_equal(
        new_first[key], np.where(cond, second[key], first[key]))
    np.testing.assert_array_equal(
        new_second[key], np.where(cond, first[key], second[key]))
  # Same key, same swaps.
  again = fn(jax.random.key(0), first, second, label)[3]
  np.testing.assert_array_equal(again, swapped)


def test_random_order_swap_keeps_antisymmetric_pm_loss():
  # A position-unbiased scorer (logit = g(first) - g(second)) has the same
  # loss after any swap; eq. 5's per-example expectation over the swap is
  # 1/2 [-log r(w, l)] + 1/2 [-log(1 - r(l, w))].
  batch = 64
  g_w = jax.random.normal(jax.random.key(1), (batch,))
  g_l = jax.random.normal(jax.random.key(2), (batch,))
  label = jnp.ones((batch,))
  before = losses.pm_pairwise_loss(g_w - g_l, label)
  a, b, new_label, _ = losses.random_order_swap(jax.random.key(3), g_w, g_l,
                                                label)
  after = losses.pm_pairwise_loss(a - b, new_label)
  np.testing.assert_allclose(after, before, rtol=1e-6)
  # A biased scorer (constant +1 for the first slot) is not invariant: the
  # swap is what exposes position bias to the loss.
  biased_before = losses.pm_pairwise_loss(g_w - g_l + 1.0, label)
  biased_after = losses.pm_pairwise_loss(a - b + 1.0, new_label)
  assert not np.allclose(biased_after, biased_before)
  z = np.asarray(g_w - g_l + 1.0)
  z_swapped = np.asarray(g_l - g_w + 1.0)
  eq5 = 0.5 * np.log1p(np.exp(-z)) + 0.5 * np.log1p(np.exp(z_swapped))
  both = 0.5 * (losses.pm_pairwise_loss(jnp.asarray(z), label) +
                losses.pm_pairwise_loss(jnp.asarray(z_swapped), 1.0 - label))
  np.testing.assert_allclose(both, eq5, rtol=1e-5)


def test_random_order_swap_validates_batch():
  with pytest.raises(ValueError, match=r"leaf .*\[1\].*leading dimension 2"):
    losses.random_order_swap(jax.random.key(0), [jnp.zeros(2), jnp.zeros(3)],
                             [jnp.zeros(2), jnp.zeros(3)], jnp.ones(2))
  with pytest.raises(ValueError, match="same structure"):
    losses.random_order_swap(jax.random.key(0), (jnp.zeros(2),),
                             [jnp.zeros(2)], jnp.ones(2))


# ---------------------------------------------------------- padding invariance


def _token_inputs(rng, batch, length, vocab, lengths, extra_pad):
  """Logits/targets/mask with `lengths` real tokens and garbage after them."""
  total = length + extra_pad
  logits = rng.normal(size=(batch, total, vocab)).astype(np.float32) * 3
  targets = rng.integers(1, vocab, size=(batch, total))
  mask = (np.arange(total)[None, :] < np.asarray(lengths)[:, None])
  targets = np.where(mask, targets, 0)
  return logits, targets, mask


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_every_loss_is_invariant_to_extra_padding(reduction):
  rng = np.random.default_rng(0)
  batch, length, vocab = 3, 5, 7
  lengths = [5, 2, 3]
  base = {side: _token_inputs(rng, batch, length, vocab, lengths, 0)
          for side in ("pc", "pr", "rc", "rr")}

  def seq_logprobs(extra_pad):
    out = {}
    for side, (logits, targets, mask) in base.items():
      pad_logits = np.concatenate(
          [logits, rng.normal(size=(batch, extra_pad, vocab)) * 100], axis=1)
      pad_targets = np.concatenate(
          [targets, np.zeros((batch, extra_pad), int)], axis=1)
      pad_mask = np.concatenate(
          [mask, np.zeros((batch, extra_pad), bool)], axis=1)
      tok = losses.token_logprobs(jnp.asarray(pad_logits, jnp.float32),
                                  jnp.asarray(pad_targets))
      out[side] = losses.sequence_logprob(tok, jnp.asarray(pad_mask),
                                          reduction=reduction)
    return out, pad_logits, pad_targets, pad_mask

  results = []
  for extra in (0, 6):
    seq, logits, targets, mask = seq_logprobs(extra)
    row = {name: losses.pair_loss(
        name, policy_chosen=seq["pc"], policy_rejected=seq["pr"],
        ref_chosen=seq["rc"], ref_rejected=seq["rr"], beta=0.1,
        label=jnp.array([1.0, 0.7, 0.0])) for name in losses.PAIR_LOSS_NAMES}
    row["sft"] = losses.sft_token_loss(jnp.asarray(logits, jnp.float32),
                                       jnp.asarray(targets),
                                       jnp.asarray(mask, jnp.float32))
    row["pm"] = losses.pm_pairwise_loss(seq["pc"] - seq["pr"],
                                        jnp.array([1.0, 0.7, 0.0]))
    row["bt"] = losses.bradley_terry_loss(seq["pc"], seq["pr"])
    results.append(row)
  for row in results[1:]:
    for name, value in row.items():
      jax.tree.map(lambda a, b, n=name: np.testing.assert_allclose(
          a, b, rtol=1e-6, atol=1e-6, err_msg=n), value, results[0][name])


def test_sum_and_mean_reductions_on_padded_inputs():
  rng = np.random.default_rng(1)
  logits, targets, mask = _token_inputs(rng, 3, 6, 5, [6, 1, 4], 3)
  tok = np.asarray(losses.token_logprobs(jnp.asarray(logits),
                                         jnp.asarray(targets)))
  summed = losses.sequence_logprob(jnp.asarray(tok), jnp.asarray(mask),
                                   reduction="sum")
  mean = losses.sequence_logprob(jnp.asarray(tok), jnp.asarray(mask),
                                 reduction="mean")
  # Plain-Python reference, row by row.
  for row, n in enumerate([6, 1, 4]):
    expected = math.fsum(float(tok[row, t]) for t in range(n))
    np.testing.assert_allclose(summed[row], expected, rtol=1e-6)
    np.testing.assert_allclose(mean[row], expected / n, rtol=1e-6)


# ---------------------------------------------------------------- gradients


def _central_difference(fn, args, index, eps=1e-6):
  """Numerical d sum(fn(*args)) / d args[index], float64."""
  fn = jax.jit(fn)  # one compile; only values change below
  base = [np.asarray(a, np.float64) for a in args]
  grad = np.zeros_like(base[index])
  for pos in np.ndindex(base[index].shape):
    plus = [a.copy() for a in base]
    minus = [a.copy() for a in base]
    plus[index][pos] += eps
    minus[index][pos] -= eps
    grad[pos] = (float(jnp.sum(fn(*plus))) -
                 float(jnp.sum(fn(*minus)))) / (2 * eps)
  return grad


# Inputs keep away from the hinge's kink at beta Delta = 1.
GRAD_CASES = {
    "ipo_margin": lambda pw, pl, rw, rl, p: losses.pair_loss(
        "ipo", policy_chosen=pw, policy_rejected=pl, ref_chosen=rw,
        ref_rejected=rl, beta=0.3, label=p),
    "ipo_app_b": lambda pw, pl, rw, rl, p: losses.pair_loss(
        "ipo", policy_chosen=pw, policy_rejected=pl, ref_chosen=rw,
        ref_rejected=rl, beta=0.3, label=p, ipo_convention="app_b"),
    "dpo": lambda pw, pl, rw, rl, p: losses.pair_loss(
        "dpo", policy_chosen=pw, policy_rejected=pl, ref_chosen=rw,
        ref_rejected=rl, beta=0.3, label=p),
    "slic": lambda pw, pl, rw, rl, p: losses.pair_loss(
        "slic", policy_chosen=pw, policy_rejected=pl, ref_chosen=rw,
        ref_rejected=rl, beta=0.3, label=p),
    "best_of_2": lambda pw, pl, rw, rl, p: losses.pair_loss(
        "best_of_2", policy_chosen=pw, policy_rejected=pl, ref_chosen=rw,
        ref_rejected=rl, beta=0.3, label=p),
    "bradley_terry": lambda pw, pl, rw, rl, p: losses.bradley_terry_loss(
        pw - rw, pl - rl, label=p),
    "pm": lambda pw, pl, rw, rl, p: losses.pm_pairwise_loss(pw - pl, p),
}


@jit_modes
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_pair_gradients_match_finite_differences(case, use_jit):
  fn = GRAD_CASES[case]
  with jax.enable_x64(True):
    args = [np.array([-3.0, -1.2, -7.0]), np.array([-2.5, -4.0, -6.1]),
            np.array([-2.0, -1.0, -8.5]), np.array([-3.3, -3.0, -5.0]),
            np.array([1.0, 0.6, 0.2])]
    grad_fn = _maybe_jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1)),
                         use_jit)
    grads = grad_fn(*[jnp.asarray(a, jnp.float64) for a in args])
    assert grads[0].dtype == jnp.float64
    for index in (0, 1):
      np.testing.assert_allclose(grads[index],
                                 _central_difference(fn, args, index),
                                 rtol=1e-6, atol=1e-8)


@jit_modes
def test_token_level_gradients_match_finite_differences(use_jit):
  rng = np.random.default_rng(2)
  logits, targets, mask = _token_inputs(rng, 2, 3, 4, [3, 2], 0)
  targets_j, mask_j = jnp.asarray(targets), jnp.asarray(mask)

  def seq_fn(lg):
    return losses.sequence_logprob(losses.token_logprobs(lg, targets_j),
                                   mask_j, reduction="mean")

  def sft_fn(lg):
    return losses.sft_token_loss(lg, targets_j, mask_j.astype(lg.dtype),
                                 z_loss=0.1).loss_sum

  with jax.enable_x64(True):
    for fn in (seq_fn, sft_fn):
      grad = _maybe_jit(jax.grad(lambda lg: jnp.sum(fn(lg))), use_jit)(
          jnp.asarray(logits, jnp.float64))
      np.testing.assert_allclose(grad, _central_difference(fn, [logits], 0),
                                 rtol=1e-6, atol=1e-8)
      # Padded positions get exactly zero gradient.
      np.testing.assert_array_equal(np.asarray(grad)[1, 2], 0.0)
