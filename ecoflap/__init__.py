"""ECoFLaP: coarse-to-fine layer-wise pruning (Sung et al., ICLR 2024) as a reusable package.

Where things live:
  models/      model download (hub or embedded) and one adapter per model family
  data/        calibration windows (C4 or the embedded Austen text)
  scoring/     coarse stage: zeroth-order / first-order block scores, OWL outlier ratios
  allocation/  per-layer sparsity from scores (ECoFLaP, uniform, OWL)
  pruning/     the sequential layer-wise engine and the pruners plugged into it
  evaluation/  perplexity and lm-eval multiple choice
  reporting/   tables and plots across methods and sparsities
"""

__version__ = "0.1.0"
