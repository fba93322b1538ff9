"""Sweeps: the ablation sweeper and the Optuna sweeper as Hydra plugins, and the end-of-sweep callback."""
