"""Launchers: start a gin-configured run on this machine, a TPU VM slice, GKE, SLURM or Dataflow.

Every launcher takes the same arguments as `cm3leon_jax.main` does through
`launch/local.sh` (a gin file, a MODEL_DIR and `--gin.KEY=VALUE` overrides), builds
the one command line `python -m cm3leon_jax.main ...` that each host runs, and wraps
it in the commands of its engine. `--dry_run` prints those commands instead of
running them. Run them from the repository root, e.g. `python -m launch.tpu_vm --help`.
"""
