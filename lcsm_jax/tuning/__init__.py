"""Measuring this machine: tau='auto' per session (`engine_tau`: the engine timed for tiling
bases above 2), the direct/FFT block crossover (`crossover`), the JSON caches of both
(`cache`), the device and CPUs results are keyed by (`machine`), timing helpers (`timing`),
and XLA:CPU's scheduler, which an application may turn off for its process before JAX starts
(`scheduler`). Nothing here runs unless called."""
