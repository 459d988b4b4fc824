"""Measuring this machine: tau='auto' per session (`engine_tau`: the engine timed for tiling
bases above 2), the direct/FFT block crossover (`crossover`), the JSON caches of both
(`cache`), the device and CPUs results are keyed by (`machine`), and timing helpers (`timing`).
Nothing here runs unless called."""
