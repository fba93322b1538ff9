"""leverplus's resumable Optuna sweeper (``hydra/sweeper=leverplus_optuna``); see ``resumable_sweeper``."""
