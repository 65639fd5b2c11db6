"""ECoFLaP: coarse-to-fine layer-wise pruning (Sung et al., ICLR 2024) as a reusable package.

Where things live (README, "Where things live", has the full map):
  catalog.py   every scorer, allocation, pruner, family, source and dataset, with defaults
  config.py    the config schema (completed from the catalog) and its cross-checks
  cli.py       one subcommand per pipeline stage; each takes its config entry as --spec
  models/      the adapter interface, one module per family, loading, offload
  data/        calibration windows and image-caption batches, evaluation sets, file checks
  blocks/      the block-by-block loop shared by pruning and scoring
  scoring/     coarse stage: zeroth-order, first-order, checkpointed gradients, OWL ratios
  allocation/  per-layer sparsity from scores (uniform, ECoFLaP, OWL)
  pruning/     the sequential layer-wise engine and the pruners plugged into it
  evaluation/  perplexity, lm-eval tasks, vision-language tasks and their metrics
  reporting/   tables and plots across methods and sparsities
  utils/       atomic writes and provenance, GPU leases, resources, runtime helpers
"""

__version__ = "0.1.0"
