"""One-call generation and scoring: thin wrappers of `Decoder` sized for one request."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcsm_jax import validation
from lcsm_jax.decoding.decoder import Decoder, GenerationOutput
from lcsm_jax.decoding.options import EngineOptions

Array = jax.Array


def generate(params: Any, config, prompt_ids, num_tokens: int, key: Array | None = None, *,
             strategy: str = "flash", temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None,
             return_logits: bool = False, gumbel_noise=None, row_keys=None,
             on_token: Callable[[int, np.ndarray], None] | None = None,
             distilled: Any = None, check_finite: bool = True,
             mesh: jax.sharding.Mesh | None = None,
             mesh_axes: tuple[str | None, str | None] = ("data", "model"),
             step_weights: Any = "float32",
             options: EngineOptions | None = None, **engine_options) -> GenerationOutput:
  """Samples `num_tokens` tokens after `prompt_ids` from a Hyena language model, exactly.

  A `Decoder` with max_length = P + num_tokens - 1, one prefill and one `generate` call; see
  `Decoder.generate` for the sampling arguments.

  Args:
    params: `{'params': ...}` of `HyenaLM(config)`.
    config: the model's configuration.
    prompt_ids: (B, P) integer token ids, P >= 1, P + num_tokens - 1 <= config.l_max.
    num_tokens: N >= 1 tokens to generate.
    key: PRNG key (needed unless temperature=0, or `row_keys` or `gumbel_noise` is given).
      Row b draws the noise of step j from fold_in(fold_in(key, b), j): a row's tokens depend
      on its prompt, its index and the key, not on the strategy, batch size or other rows.
    strategy: a registered strategy name (`lcsm_jax.STRATEGIES`), 'flash' by default.
    temperature: softmax temperature; 0 means greedy decoding. Values are clamped to
      [sampling.MIN_TEMPERATURE, sampling.MAX_TEMPERATURE] (1e-30 and 1e30: to float32
      precision, greedy and uniform among the filtered tokens).
    top_k, top_p: sample among the k most likely tokens / the smallest set of mass >= top_p.
    eos_id: a row stops at this token; its later tokens repeat it.
    return_logits: also return the logits of every step (B, N, vocab_size).
    gumbel_noise: (B, N, vocab_size) noise replacing the key's
      (token j = argmax(filtered logits_j + temperature * gumbel_noise[:, j])).
    row_keys: (B,) PRNG keys, one per row, instead of `key`: row b draws the noise of step j
      from fold_in(row_keys[b], j), so its tokens do not depend on its place in the batch.
    on_token: called on the host as on_token(j, tokens (B,)) when token j is chosen, in
      order (for streaming output; costs a host round trip per token).
    distilled: the distilled filters strategy='modal' runs on (`lcsm_jax.distill`); the
      sequence may then outgrow l_max.
    check_finite: refuse parameters holding NaN or infinity (one pass over the parameters,
      outside the token loop).
    mesh, mesh_axes: generate on a device mesh, batch rows on its data axis and channels on
      its model axis (see `Decoder`); the batch must divide over the data axis.
    step_weights: 'float32' (default) or 'bfloat16': the dtype the step reads its dense
      kernels in; 'bfloat16' samples from the model with those kernels rounded to bfloat16
      (see `Decoder`).
    options, **engine_options: `EngineOptions` (tau, layer_parallel, ..., check_memory).

  Returns:
    GenerationOutput(tokens (B, N), lengths (B,), logits (B, N, vocab_size) or None).

  Raises:
    ValueError, TypeError: bad input, named. `InsufficientMemoryError` (a ValueError): the
      run's estimated memory exceeds what is available (before anything runs).
  """
  options = EngineOptions.create(options, **engine_options)
  prompt = validation.check_token_ids(prompt_ids, config, name="prompt_ids")
  num_tokens = validation.check_positive_int(num_tokens, "num_tokens")
  batch, length = prompt.shape
  total = length + num_tokens - 1
  if total > config.l_max and distilled is None:
    raise ValueError(f"prompt length {length} + num_tokens {num_tokens} - 1 = {total} exceeds "
                     f"the model's maximum length l_max = {config.l_max}.")
  decoder = Decoder(params, config, strategy, max_length=total, options=options,
                    distilled=distilled, check_finite=check_finite, donate_state=True,
                    mesh=mesh, mesh_axes=mesh_axes, step_weights=step_weights)
  decoder.engine(batch)  # on a mesh: a batch that does not divide is refused here
  decoder.check_request(batch, length, num_tokens,
                        advice="reduce the batch size or the number of tokens")
  state = decoder.prefill(prompt)
  output, _ = decoder.generate(state, num_tokens, key, temperature=temperature, top_k=top_k,
                               top_p=top_p, eos_id=eos_id, return_logits=return_logits,
                               row_keys=row_keys, gumbel_noise=gumbel_noise,
                               on_token=on_token)
  return output


def teacher_forced_logits(params: Any, config, token_ids, *, prompt_length: int = 0,
                          strategy: str = "flash", distilled: Any = None,
                          check_finite: bool = True, mesh: jax.sharding.Mesh | None = None,
                          mesh_axes: tuple[str | None, str | None] = ("data", "model"),
                          step_weights: Any = "float32",
                          options: EngineOptions | None = None, **engine_options) -> Array:
  """Feeds given tokens one position at a time and returns the logits of every position.

  The first `prompt_length` tokens go through one parallel prefill, the rest through the
  engine of `strategy` (`Decoder.score`); the result equals the parallel forward
  `HyenaLM(config).apply` (with strategy='modal', the forward with the distilled filters:
  `HyenaLM(config).apply(params, ids, taps=...)`; with step_weights='bfloat16', the forward
  with the dense kernels rounded to bfloat16). `distilled`, `check_finite`, `mesh`,
  `mesh_axes`, `step_weights` and the options are as in `generate`.

  Returns:
    (B, L, padded_vocab) float32.
  """
  options = EngineOptions.create(options, **engine_options)
  tokens = validation.check_token_ids(token_ids, config, name="token_ids")
  batch, total = tokens.shape
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or \
      not 0 <= prompt_length <= total:
    raise ValueError(f"prompt_length must be an integer in [0, {total}], got {prompt_length!r}.")
  prompt_length = int(prompt_length)
  decoder = Decoder(params, config, strategy, max_length=total, options=options,
                    distilled=distilled, check_finite=check_finite, donate_state=True,
                    mesh=mesh, mesh_axes=mesh_axes, step_weights=step_weights)
  decoder.engine(batch)  # on a mesh: a batch that does not divide is refused here
  decoder.check_request(batch, prompt_length,
                        advice="score fewer or shorter sequences at a time")
  logits, state = decoder.prefill(tokens[:, :prompt_length], return_logits=True)
  if prompt_length == total:
    return logits
  rest, _ = decoder.score(state, tokens[:, prompt_length:])
  return jnp.concatenate([logits, rest], axis=1)
