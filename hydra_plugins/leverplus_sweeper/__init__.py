"""Hydra plugins shipped with leverplus (discovered through the ``hydra_plugins`` namespace package)."""
