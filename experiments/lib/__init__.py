"""What the experiment runners share, one module per job:

  machine    facts about the machine (CPU, memory, peak RSS, read bandwidth)
  store      the result store (skips finished points, sets aside other machines' stores), CSV
  plots      pyplot on Agg, save_figure, log-log length axes, a runner's output paths
  workloads  the models under test and their programs, built on the public decoding API
             (`lcsm_jax.decoding.Rollout` for the stack, `lcsm_jax.Decoder` for the LM)
  sampling   one strategy's time: full runs, or sampled / extrapolated for slow strategies
  blocks     flash's blocks timed in a compiled loop (`lcsm_jax.decoding.blocks`), crossovers
  flags      the absl flags the runners share
"""
