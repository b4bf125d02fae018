"""noble: an experiment runner and ablation tool for NOBLE (nonlinear low-rank branches for linear layers)."""

__version__ = "0.1.0"
