"""Build a pointer network from the ``model`` config: fresh, or loaded from a checkpoint file."""

from __future__ import annotations

from typing import Any, Dict

from leverplus.model.checkpoint import load_pointer_checkpoint
from leverplus.model.pointer import PointerSelector


def model_kwargs(model_cfg: Any) -> Dict[str, Any]:
    """The ``PointerSelector`` keyword arguments the ``model`` config sets (everything but ``d_model``)."""
    m = model_cfg
    return dict(
        hidden_dim=m.hidden_dim,
        num_heads=m.num_heads,
        num_layers=m.num_layers,
        dropout=m.dropout,
        attn_dropout=m.attn_dropout,
        temperature=m.temperature,
        use_query_update_gate=m.use_query_update_gate,
        mask_value=m.mask_value,
        label_smoothing=m.label_smoothing,
    )


def build_model(model_cfg: Any, d_model: int) -> PointerSelector:
    """A freshly initialised pointer network for ``d_model``-dimensional embeddings."""
    return PointerSelector(d_model=d_model, **model_kwargs(model_cfg))


def load_model(model_cfg: Any, path: str, d_model: int) -> PointerSelector:
    """A pointer network loaded from any supported checkpoint format, strictly unless ``model.strict_load=false``."""
    return load_pointer_checkpoint(path, strict=model_cfg.strict_load, d_model=d_model, **model_kwargs(model_cfg))
