"""Input checks: every bad input gives a TypeError/ValueError that says what is wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcsm_jax import validation
from lcsm_jax.errors import CheckpointError
from lcsm_jax.models.hyena.config import HyenaConfig
from lcsm_jax.models.hyena.params import check_params_match, init_params
from lcsm_jax.validation import check_dtype, check_token_ids

CONFIG = HyenaConfig(vocab_size=12, d_model=4, n_layer=1, d_inner=8, l_max=20, filter_order=4,
                     emb_dim=3)


@pytest.mark.parametrize("ids", [
    [[1, 2, 3]],
    np.array([[0, 11]], np.int64),
    np.array([[5, 6], [7, 8]], np.uint8),
    jnp.array([[3, 4, 5]], jnp.int32),
    np.zeros((2, 20), np.int16),
])
def test_valid_token_ids(ids):
  out = check_token_ids(ids, CONFIG)
  assert isinstance(out, np.ndarray) and out.dtype == np.int32 and out.flags.c_contiguous
  np.testing.assert_array_equal(out, np.asarray(ids))


@pytest.mark.parametrize("ids,error,match", [
    (None, TypeError, "input_ids must be a .batch, length. array of token ids, got None"),
    ([1, 2, 3], ValueError, r"must be 2-D \(batch, length\), got shape \(3,\) \(add a batch"),
    (np.zeros((1, 2, 3), np.int32), ValueError, r"must be 2-D \(batch, length\), got shape"),
    (np.int32(3), ValueError, r"got shape \(\)"),
    ([[1.0, 2.0]], TypeError, "must hold integer token ids, got dtype float64"),
    (jnp.array([[1.0]], jnp.bfloat16), TypeError, "got dtype bfloat16"),
    (np.array([[True, False]]), TypeError, "got booleans"),
    ([["a", "b"]], TypeError, "got dtype <U1"),
    ([[1, 2], [3]], ValueError, "rectangular"),
    ([[]], ValueError, r"empty \(length 0\)"),
    (np.zeros((0, 4), np.int32), ValueError, "batch size 0"),
    (np.zeros((1, 21), np.int32), ValueError, "has length 21, more than the model's maximum "
                                              "length l_max = 20"),
    ([[0, 1, 12]], ValueError, r"input_ids\[0, 2\] = 12 is outside the vocabulary \[0, 12\)"),
    ([[0, 1], [2, -1]], ValueError, r"input_ids\[1, 1\] = -1 is outside the vocabulary"),
    ([[99, 1, 100]], ValueError, r"input_ids\[0, 0\] = 99 .* \(2 ids are out of range\)"),
    (np.array([[2**40]], np.int64), ValueError, r"= 1099511627776 is outside the vocabulary"),
])
def test_invalid_token_ids(ids, error, match):
  with pytest.raises(error, match=match):
    check_token_ids(ids, CONFIG)


def test_token_id_options():
  assert check_token_ids([[]], CONFIG, allow_empty=True).shape == (1, 0)
  assert check_token_ids(np.zeros((3, 0), np.int64), CONFIG, allow_empty=True).dtype == np.int32
  assert check_token_ids([[1, 2, 3]], CONFIG, max_length=3).shape == (1, 3)
  with pytest.raises(ValueError, match=r"prompt_ids has length 4, more than the allowed maximum "
                                       r"max_length = 3 \(the model's l_max is 20\)"):
    check_token_ids([[1, 2, 3, 4]], CONFIG, name="prompt_ids", max_length=3)
  with pytest.raises(ValueError, match=r"prompt_ids\[0, 0\] = 12"):
    check_token_ids([[12]], CONFIG, name="prompt_ids")
  with pytest.raises(ValueError, match="max_length must be a non-negative integer"):
    check_token_ids([[1]], CONFIG, max_length=-1)
  with pytest.raises(TypeError, match="config must be a lcsm_jax HyenaConfig, got dict"):
    check_token_ids([[1]], {"vocab_size": 12})


def test_token_ids_inside_jit_are_refused():
  with pytest.raises(TypeError, match="concrete array, got a traced value"):
    jax.jit(lambda x: check_token_ids(x, CONFIG))(jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, "float32", np.dtype("float32"), jnp.bfloat16,
                                   "bfloat16"])
def test_supported_dtypes(dtype):
  assert check_dtype(dtype) in (np.dtype("float32"), np.dtype(jnp.bfloat16))


@pytest.mark.parametrize("dtype,error,match", [
    (jnp.float16, ValueError, "float16 is not supported; use float32 or bfloat16"),
    (jnp.int32, ValueError, "int32 is not supported"),
    (jnp.complex64, ValueError, "complex64 is not supported"),
    ("not-a-dtype", TypeError, "'not-a-dtype' is not a dtype"),
    (None, TypeError, "got None"),
    (jnp.float64, ValueError, "float64 needs 64-bit JAX"),
])
def test_unsupported_dtypes(dtype, error, match):
  with pytest.raises(error, match=match):
    check_dtype(dtype)


def test_float64_with_x64():
  with jax.enable_x64(True):
    assert check_dtype(jnp.float64) == np.float64
    assert check_dtype("float64") == np.float64


def test_check_params_match_uses_the_checkpoint_check():
  shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  check_params_match(CONFIG, params)  # no error
  params["params"]["ln_f"]["bias"] = np.zeros((5,), np.float32)
  with pytest.raises(CheckpointError, match=r"params/ln_f/bias has shape \(5,\), the config "
                                            r"expects \(4,\)"):
    check_params_match(CONFIG, params)
  with pytest.raises(TypeError, match="params must be a dict"):
    check_params_match(CONFIG, [1])
  with pytest.raises(TypeError, match="config must be a lcsm_jax HyenaConfig"):
    check_params_match("tiny", params)
  assert issubclass(CheckpointError, ValueError)
  assert validation.check_config(CONFIG) is CONFIG
