"""The 'modal' strategy: exact for the model whose long filters are the modal ones.

References are independent of the strategy: a float64 NumPy recurrence for the prompt state,
the exact strategies (flash) and the parallel forward run on the materialised taps
Re sum R p^(t-1)."""

from flax import struct
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import decoding
from lcsm_jax.decoding.strategies import modal
from lcsm_jax.distillation.modal import powers
from lcsm_jax.models.conv_stack import ConvStack
from lcsm_jax.models.hyena import HyenaConfig, HyenaLM, init_params
from lcsm_jax import models

CONFIG = HyenaConfig(vocab_size=13, d_model=8, n_layer=2, d_inner=16, l_max=40, order=3,
                     filter_order=8, emb_dim=3)


@struct.dataclass
class Filters:
  """The fields the strategy reads (`lcsm_jax.distillation.ModalFilters` has them too)."""
  poles: jax.Array
  residues: jax.Array


def random_filters(streams, width, half_order, seed):
  rng = np.random.default_rng(seed)
  radius = rng.uniform(0.3, 0.97, (streams, width, half_order))
  angle = rng.uniform(-np.pi, np.pi, (streams, width, half_order))
  poles = radius * np.exp(1j * angle)
  residues = (rng.standard_normal((streams, width, half_order))
              + 1j * rng.standard_normal((streams, width, half_order))) / half_order
  return Filters(jnp.asarray(poles, jnp.complex64), jnp.asarray(residues, jnp.complex64))


def materialised(filters, tap0, length):
  """(length, S, D) float64 taps: tap0, then Re sum R p^(t-1), by NumPy."""
  p = np.asarray(filters.poles, np.complex128)
  r = np.asarray(filters.residues, np.complex128)
  t = np.arange(length - 1)[:, None, None, None]
  rest = (r[None] * p[None] ** t).sum(-1).real
  return np.concatenate([np.asarray(tap0, np.float64)[None], rest])


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(length=st.integers(1, 300), half_order=st.integers(1, 5),
                  batch=st.integers(1, 3), chunk=st.sampled_from([1, 7, 64, 512]))
def test_prompt_state_equals_the_recurrence(length, half_order, batch, chunk):
  filters = random_filters(2, 3, half_order, seed=length)
  inputs = np.random.default_rng(length + 1).standard_normal((length, 2, batch, 3))
  p = np.asarray(filters.poles, np.complex128)
  x = np.zeros((2, batch, 3, half_order), np.complex128)
  for a in inputs:  # x[t] = p x[t-1] + a[t]
    x = x * p[:, None] + a[..., None]
  vandermonde = modal.prompt_state_vandermonde(filters.poles, jnp.asarray(inputs, jnp.float32),
                                               chunk)
  fft = modal.prompt_state_fft(filters.poles, jnp.asarray(inputs, jnp.float32))
  scale = np.abs(x).max()
  np.testing.assert_allclose(vandermonde, x, atol=2e-5 * scale)
  np.testing.assert_allclose(fft, x, atol=2e-5 * scale)


def test_zero_poles_are_exact():
  poles = jnp.zeros((1, 1, 2), jnp.complex64)
  np.testing.assert_array_equal(powers(poles, 4)[:, 0, 0, 0], [1, 0, 0, 0])
  inputs = jnp.arange(1, 6, dtype=jnp.float32).reshape(5, 1, 1, 1)
  np.testing.assert_allclose(modal.prompt_state_vandermonde(poles, inputs, 2)[0, 0, 0], [5, 5])


@pytest.mark.parametrize("prompt_len,batch,half_order,prefill", [
    (1, 1, 1, "vandermonde"), (3, 2, 4, "vandermonde"), (9, 1, 8, "fft"), (20, 3, 2, "fft")])
def test_rollout_equals_flash_on_the_materialised_filters(prompt_len, batch, half_order,
                                                          prefill):
  stack = ConvStack(2, 5, 64)
  params = stack.init(jax.random.key(1))
  filters = random_filters(2, 5, half_order, seed=prompt_len)
  prompt = jax.random.normal(jax.random.key(2), (batch, prompt_len, 5))
  steps = 64 - prompt_len
  taps = materialised(filters, params["taps"][:, 0], 64)  # (T, S, D), tap 0 the model's own
  distilled_params = dict(params, taps=jnp.asarray(np.swapaxes(taps, 0, 1), jnp.float32))
  want = decoding.rollout(distilled_params, stack, prompt, steps, strategy="flash", tau=4)
  session = decoding.Rollout(params, stack, "modal", max_length=64, distilled=filters)
  if prefill == "fft":
    session.engine(batch)  # the registry's default prefill is the Vandermonde sum
    session._engines[batch] = decoding.Engine(  # pylint: disable=protected-access
        stack, modal.Modal(prefill="fft"), 64)
  outputs, state = session.prefill(prompt)
  rest, _ = session.run(state, steps)
  got = np.concatenate([outputs, rest], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt_length", [0, 3, 12])
def test_scoring_equals_the_parallel_forward_with_the_modal_filters(prompt_length):
  params = init_params(CONFIG, jax.random.key(0))
  model = models.online_model(CONFIG)
  filters = random_filters(model.num_streams, model.width, 3, seed=prompt_length)
  tap0 = model.filters(params, 1)[0][0]
  taps = jnp.asarray(materialised(filters, tap0, CONFIG.l_max), jnp.float32)
  ids = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, CONFIG.l_max))
  want = np.asarray(HyenaLM(CONFIG).apply(params, ids, taps=taps))
  exact = np.asarray(HyenaLM(CONFIG).apply(params, ids))
  got = np.asarray(decoding.teacher_forced_logits(params, CONFIG, ids, strategy="modal",
                                                  distilled=filters,
                                                  prompt_length=prompt_length))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  assert np.abs(got - exact).max() > 1e-2  # the modal filters are not the model's


def test_generation_continues_past_l_max_in_chunks():
  params = init_params(CONFIG, jax.random.key(0))
  model = models.online_model(CONFIG)
  filters = random_filters(model.num_streams, model.width, 2, seed=5)
  decoder = decoding.Decoder(params, CONFIG, "modal", max_length=3 * CONFIG.l_max,
                             distilled=filters)
  prompt = np.arange(12).reshape(2, 6) % CONFIG.vocab_size
  one, _ = decoder.generate(decoder.prefill(prompt), 100, jax.random.key(0), temperature=1.5)
  state = decoder.prefill(prompt)
  parts = []
  for size in (30, 40, 30):
    out, state = decoder.generate(state, size, jax.random.key(0), temperature=1.5)
    parts.append(np.asarray(out.tokens))
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), one.tokens)
  assert int(state.length) == 106 > CONFIG.l_max
  with pytest.raises(ValueError, match="prompt_ids has length 41, more than the allowed maximum"):
    decoder.prefill(np.ones((1, CONFIG.l_max + 1), np.int32))


def test_the_state_does_not_grow_with_the_length():
  params = init_params(CONFIG, jax.random.key(0))
  model = models.online_model(CONFIG)
  filters = random_filters(model.num_streams, model.width, 4, seed=0)
  sizes = []
  for max_length in (40, 10**6):
    decoder = decoding.Decoder(params, CONFIG, "modal", max_length=max_length,
                               distilled=filters)
    state = decoder.state_shape(3, 5)
    assert state.engine.strategy.x.shape == (model.num_streams, 3, 4, model.width)
    sizes.append(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
  assert sizes[0] == sizes[1]


def test_bad_distilled_inputs_are_refused():
  params = init_params(CONFIG, jax.random.key(0))
  good = random_filters(4, 8, 2, seed=0)
  with pytest.raises(ValueError, match="strategy 'modal' needs distilled filters"):
    decoding.Decoder(params, CONFIG, "modal")
  with pytest.raises(ValueError, match=r"poles has shape \(4, 9, 2\), the model needs \(4, 8"):
    decoding.Decoder(params, CONFIG, "modal", distilled=random_filters(4, 9, 2, seed=0))
  with pytest.raises(TypeError, match="distilled must be"):
    decoding.Decoder(params, CONFIG, "modal", distilled=np.zeros((4, 8, 2)))
  with pytest.raises(ValueError, match="strategy 'flash' takes no distilled filters"):
    decoding.Decoder(params, CONFIG, "flash", distilled=good)
  with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
    decoding.Decoder(params, CONFIG, "modal", max_length=0, distilled=good)
  with pytest.raises(ValueError, match="modal prefill must be one of"):
    modal.Modal(prefill="direct")
