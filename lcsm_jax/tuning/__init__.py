"""Measuring this machine: the direct/FFT block crossover behind `tau='auto'` (`crossover`), the
CPU model results are keyed by (`machine`), and timing helpers (`timing`). Nothing here runs
unless called."""
