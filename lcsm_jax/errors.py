"""Errors raised by lcsm_jax besides the built-in `TypeError` and `ValueError`."""


class CheckpointError(ValueError):
  """A checkpoint does not match the model it claims to describe."""
