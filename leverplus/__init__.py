"""leverplus: trustworthy, cheap reward ablations for Lever-Plus v3.

Pipeline (one module per concern):
formats -> dataset -> model -> losses/schedules -> trainer -> evaluation -> tracking -> app (train, compare).
"""

__version__ = "0.1.0"
