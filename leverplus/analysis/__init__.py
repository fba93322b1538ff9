"""Analysis: comparing a sweep against its baseline (tables, tests, figures) and the Optuna study report."""
