"""Evaluation: the VQA metric, offline ranking of held-out groups, downstream VQA accuracy, statistics."""
