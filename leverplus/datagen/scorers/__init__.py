"""Scorers: an LVLM plus the VQA data it answers about, behind one interface (base.py); configs in config.py."""
