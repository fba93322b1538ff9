"""Tracking: the MLflow store, run lifecycle (params, metrics, tags, artifacts), and the study parent run."""
