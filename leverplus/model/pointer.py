"""The Lever-Plus pointer network (docs/reference.md#model-architecture).

``PointerSelector`` picks ``S`` distinct in-context examples from a pool of ``K`` candidates:
encode (input projection, query-only cross-attention, projections, L2-norm), then ``S`` pointer steps
``logits_t = s·ĉ / temperature`` with already-chosen items at ``mask_value`` and a gated state update.

Parameter names and shapes are exactly the reference's, so reference checkpoints load strictly.
Padded pool entries (``cand_mask`` False) are never attended to and get ``-inf`` logits, so padding a
pool never changes any result."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from leverplus.errors import LeverPlusInputError
from leverplus.model.decoding import StepFn

log = logging.getLogger(__name__)


class RandDropout(nn.Dropout):
    """``nn.Dropout`` (keep with prob. 1−p, scale 1/(1−p)) with the mask drawn 16 bits at a time.

    One 64-bit draw of the CPU generator gives four 16-bit uniforms, so the mask costs a quarter of the generator
    calls of ``torch.rand`` (the per-element draw of the ``[B, K, H]`` candidate mask was ~8% of an RCE step;
    ``bernoulli_`` is slower still). The drop probability is ``p`` rounded to a multiple of 2⁻¹⁶ (exact for the
    default 0.5; 0.1 becomes 0.1000061) and the scale is 1/(1 − that), so the layer stays unbiased. Deterministic
    under ``torch.manual_seed``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        drop_levels = min(round(self.p * 65536), 65536)  # of 65536 equally likely 16-bit values
        if drop_levels >= 65536:
            return x * 0.0
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        u = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        keep = u >= drop_levels - 32768
        return x * keep.to(x.dtype).mul_(65536.0 / (65536 - drop_levels))


def single_query_attention(
    attn: nn.MultiheadAttention, h: torch.Tensor, c: torch.Tensor, key_padding_mask: torch.Tensor
) -> torch.Tensor:
    """``attn(h, c, c, key_padding_mask)`` for one query per row, computed in factored form: ``[B, H]``.

    Same parameters and the same function as ``nn.MultiheadAttention`` (key = value = ``c``), but with a single
    query the key and value projections need not be applied to every candidate: per head ``i``
    ``score_j = q_i·(W_k,i c_j + b_k,i) = (W_k,iᵀ q_i)·c_j + q_i·b_k,i`` and
    ``Σ_j a_j (W_v,i c_j + b_v,i) = W_v,i (Σ_j a_j c_j) + b_v,i Σ_j a_j`` (Σ a_j ≠ 1 after attention dropout).
    That is O(H²) per query instead of O(K·H²): the encoder's largest cost at K = 64 (checked against
    ``nn.MultiheadAttention`` in tests/model/test_model.py).
    """
    B, H = h.shape
    nh = attn.num_heads
    hd = H // nh
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    if attn.in_proj_bias is not None:
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    else:
        b_q = b_k = b_v = None
    q = F.linear(h, w_q, b_q).view(B, nh, hd) * hd**-0.5  # [B, nh, hd]
    u = torch.einsum("bnd,ndh->bnh", q, w_k.view(nh, hd, H))  # W_kᵀ q per head: [B, nh, H]
    scores = torch.einsum("bnh,bkh->bnk", u, c)  # [B, nh, K]
    if b_k is not None:
        scores = scores + (q * b_k.view(nh, hd)).sum(-1, keepdim=True)
    scores = scores.masked_fill(key_padding_mask.unsqueeze(1), float("-inf"))
    a = F.dropout(torch.softmax(scores, dim=-1), p=attn.dropout, training=attn.training)
    ctx = torch.einsum("bnk,bkh->bnh", a, c)  # Σ_j a_j c_j per head: [B, nh, H]
    v = torch.einsum("bnh,ndh->bnd", ctx, w_v.view(nh, hd, H))  # [B, nh, hd]
    if b_v is not None:
        v = v + b_v.view(nh, hd) * a.sum(-1, keepdim=True)
    return attn.out_proj(v.reshape(B, H))


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run a block with ``module`` in eval mode, restoring its previous train/eval mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def inputs_checked(model: "PointerSelector"):
    """Run a block with the model's per-call input checks off, for a caller that has validated its whole data set
    once (``training.trainer.check_training_data``); restores the previous setting afterwards."""
    before = model.check_inputs
    model.check_inputs = False
    try:
        yield model
    finally:
        model.check_inputs = before


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without parameters): where its inputs go."""
    first = next(iter(module.parameters()), None) if isinstance(module, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


@dataclass(frozen=True)
class ItemTable:
    """Eval-mode features of every row of an embedding table: ``c = input_proj(e)`` and ``ĉ = normalize(cand_proj(c))``.

    Without dropout a candidate's features do not depend on the query, so evaluating many pools that share items
    (3,000 eval queries × 64 slots drawn from 3,000 train items) projects each item once and gathers rows, instead
    of projecting every pool slot again. Built by :meth:`PointerSelector.item_table`; valid for the weights it was
    built from.
    """

    c: torch.Tensor  # [N, H]
    cand_hat: torch.Tensor  # [N, H]

    @property
    def num_items(self) -> int:
        return int(self.c.shape[0])


class PointerSelector(nn.Module):
    """Pointer network of Lever-Plus v2/v3 (``pointer_selector_v2.py`` at HEAD, with the V4-1 gate).

    Args (reference values in brackets):
        d_model: input embedding size [512 from CLIP in the v3 trainer].
        hidden_dim: H [256]. ``input_proj`` is ``nn.Identity`` when ``d_model == hidden_dim``.
        num_heads: attention heads [1]. Cannot be inferred from weights.
        num_layers: cross-attention layers [trainer CLI default 1; V3 class default 3].
        dropout: dropout before ``query_proj`` / ``cand_proj`` [0.5 in the v3 trainer].
        attn_dropout: dropout inside the attention [0.1].
        temperature: logit temperature [0.1]; a plain float, not saved in checkpoints (as the reference).
        use_query_update_gate: V4-1 gated state update [True = HEAD; False = the "方案五" model].
        mask_value: logit given to already-chosen items [-100.0, finite, kept in the softmax normaliser].
        label_smoothing: default smoothing of ``sequence_nll`` [0.0 in the v3 trainer].
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int = 256,
        num_heads: int = 1,
        num_layers: int = 1,
        dropout: float = 0.5,
        attn_dropout: float = 0.1,
        temperature: float = 0.1,
        use_query_update_gate: bool = True,
        mask_value: float = -100.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model < 1 or hidden_dim < 1 or num_heads < 1 or num_layers < 0:
            raise LeverPlusInputError(
                f"bad model size d_model={d_model}, hidden_dim={hidden_dim}, num_heads={num_heads}, "
                f"num_layers={num_layers}",
                field="model",
            )
        if hidden_dim % num_heads:
            raise LeverPlusInputError(
                f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}", field="model.num_heads"
            )
        if not temperature > 0:
            raise LeverPlusInputError(f"temperature must be > 0, got {temperature}", field="model.temperature")
        self.config: dict[str, Any] = dict(
            d_model=d_model,
            hidden_dim=hidden_dim,
            num_heads=num_heads,
            num_layers=num_layers,
            dropout=dropout,
            attn_dropout=attn_dropout,
            temperature=temperature,
            use_query_update_gate=use_query_update_gate,
            mask_value=mask_value,
            label_smoothing=label_smoothing,
        )
        self.d_model, self.hidden_dim, self.num_layers = d_model, hidden_dim, num_layers
        self.temperature = float(temperature)  # plain attribute: never in the state dict
        self.mask_value = float(mask_value)
        self.label_smoothing = float(label_smoothing)
        # False only inside ``inputs_checked``: a caller that validated its whole data set once skips the per-call
        # checks (finite embeddings, label and mask ranges), a tenth of a training step at any batch size
        self.check_inputs = True
        self.use_query_update_gate = bool(use_query_update_gate)

        self.input_proj: nn.Module = (
            nn.Identity() if d_model == hidden_dim else nn.Linear(d_model, hidden_dim, bias=False)
        )
        self.cross_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(hidden_dim, num_heads, dropout=attn_dropout, batch_first=True)
            for _ in range(num_layers)
        )
        self.attn_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers))
        self.query_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.cand_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        if self.use_query_update_gate:
            self.query_update_gate = nn.Linear(2 * hidden_dim, hidden_dim)
        self.dropout = RandDropout(dropout)
        self._init_weights()

    def _init_weights(self, proj_noise_std: float = 0.01) -> None:
        """Reference init: xavier input projection, I + N(0, 0.01²) projections, xavier/zero gate."""
        if isinstance(self.input_proj, nn.Linear):
            nn.init.xavier_uniform_(self.input_proj.weight)
        with torch.no_grad():
            for proj in (self.query_proj, self.cand_proj):
                nn.init.eye_(proj.weight)
                proj.weight.add_(torch.randn_like(proj.weight) * proj_noise_std)
        if self.use_query_update_gate:
            nn.init.xavier_uniform_(self.query_update_gate.weight)
            nn.init.zeros_(self.query_update_gate.bias)

    # ------------------------------------------------------------------ input checks

    def _check_inputs(
        self, query_emb: torch.Tensor, cand_emb: torch.Tensor, cand_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Validate shapes (and, unless ``check_inputs`` is off, values); return the boolean validity mask ``[B, K]``."""
        if query_emb.dim() != 2 or cand_emb.dim() != 3 or query_emb.shape[0] != cand_emb.shape[0]:
            raise LeverPlusInputError(
                f"expected query_emb [B, d] and cand_emb [B, K, d], got {tuple(query_emb.shape)} and "
                f"{tuple(cand_emb.shape)}",
                field="query_emb/cand_emb",
            )
        for name, x in (("query_emb", query_emb), ("cand_emb", cand_emb)):
            if x.shape[-1] != self.d_model:
                raise LeverPlusInputError(
                    f"last dimension is {x.shape[-1]}, the model expects d_model={self.d_model}",
                    field=name,
                    fix=f"pass model.d_model={x.shape[-1]} or use matching embeddings",
                )
            if self.check_inputs and not torch.isfinite(x).all():
                raise LeverPlusInputError("contains NaN or inf", field=name, fix="re-export the embeddings")
        if not self.check_inputs and cand_mask is not None:
            return cand_mask
        return self._check_mask(cand_mask, *cand_emb.shape[:2], device=cand_emb.device)

    @staticmethod
    def _check_mask(cand_mask: Optional[torch.Tensor], B: int, K: int, device=None) -> torch.Tensor:
        """The boolean validity mask ``[B, K]`` (all valid when None); every row needs a valid entry."""
        if cand_mask is None:
            return torch.ones(B, K, dtype=torch.bool, device=device)
        if cand_mask.shape != (B, K) or cand_mask.dtype != torch.bool:
            raise LeverPlusInputError(
                f"expected a bool tensor of shape ({B}, {K}), got {cand_mask.dtype} {tuple(cand_mask.shape)}",
                field="cand_mask",
            )
        empty = (~cand_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise LeverPlusInputError(f"batch rows {empty} have no valid candidate", field="cand_mask")
        return cand_mask

    def _check_labels(self, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Labels ``[B, G, S]`` must be integers pointing at valid (non-padded) pool entries."""
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise LeverPlusInputError(f"labels must be integer positions, got {labels.dtype}", field="labels")
        labels = labels.long()
        if not self.check_inputs:
            return labels
        K = valid.shape[1]
        if labels.numel() and (labels.min() < 0 or labels.max() >= K):
            raise LeverPlusInputError(
                f"labels must lie in [0, {K}), got min {int(labels.min())} max {int(labels.max())}",
                field="labels",
            )
        B, G, S = labels.shape
        hits = torch.gather(valid, 1, labels.reshape(B, G * S))
        if not hits.all():
            bad = (~hits).nonzero()[0].tolist()
            raise LeverPlusInputError(
                f"label points at a padded pool entry (batch row {bad[0]})",
                field="labels",
                fix="padded group members must still carry a valid pointer; mask them in the loss instead",
            )
        return labels

    # ------------------------------------------------------------------ the network

    def encode(
        self, query_emb: torch.Tensor, cand_emb: torch.Tensor, cand_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """reference#model-forward steps 1-3: return the initial state ``[B, H]`` and the candidate keys ĉ ``[B, K, H]``.

        Cross-attention updates the query only (post-norm residual); padded candidates are excluded via
        ``key_padding_mask``. Dropout is applied before ``query_proj`` / ``cand_proj``; both outputs are L2-normalised.
        """
        state, cand_hat, _ = self._encode(query_emb, cand_emb, cand_mask)
        return state, cand_hat

    def _encode(
        self, query_emb: torch.Tensor, cand_emb: torch.Tensor, cand_mask: Optional[torch.Tensor], repeat: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode`` plus the validity mask ``[B, K]`` it checked.

        ``repeat > 1``: the result for every query and pool repeated ``repeat`` times in a row (``[B·repeat, ...]``),
        each copy with its own dropout masks. The input projection has no dropout, so it runs once per query and its
        output is tiled: the same values as projecting tiled inputs, at 1/repeat of the largest product."""
        valid = self._check_inputs(query_emb, cand_emb, cand_mask)
        c = self.input_proj(cand_emb)  # [B, K, H]
        h = self.input_proj(query_emb)  # [B, H]
        if repeat > 1:
            c, h, valid = (x.repeat_interleave(repeat, dim=0) for x in (c, h, valid))
        cand_hat = F.normalize(self.cand_proj(self.dropout(c)), p=2, dim=-1)
        return self._query_state(h, c, valid), cand_hat, valid

    def _query_state(self, h: torch.Tensor, c: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The query side of ``encode`` from the projected query ``h [B, H]``: cross-attention over ``c [B, K, H]``
        (post-norm residual), dropout, ``query_proj``, L2-norm -> ``[B, H]``."""
        for attn, norm in zip(self.cross_attn_layers, self.attn_norms):
            h = norm(single_query_attention(attn, h, c, ~valid) + h)
        return F.normalize(self.query_proj(self.dropout(h)), p=2, dim=-1)

    def gate_update(self, state: torch.Tensor, chosen_hat: torch.Tensor) -> torch.Tensor:
        """V4-1 state update ``s ← normalize(g⊙s + (1−g)⊙x)``, ``g = σ(W[s; x] + b)``, x = ĉ of the chosen item.

        Returns ``state`` unchanged when the gate is off (the query stays static, as the 方案五 model).
        """
        if not self.use_query_update_gate:
            return state
        g = torch.sigmoid(self.query_update_gate(torch.cat([state, chosen_hat], dim=-1)))
        return F.normalize(g * state + (1 - g) * chosen_hat, p=2, dim=-1)

    def _unroll(
        self,
        state: torch.Tensor,
        cand_hat: torch.Tensor,
        valid: torch.Tensor,
        labels: Optional[torch.Tensor],
        steps: int,
        policy_temperature: float,
        need_preds: bool = True,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pointer steps for ``G`` sequences per query: ĉ ``[B, K, H]``, labels ``[B, G, T]``, state ``[B, G, H]``
        or ``[B, 1, H]`` when every member starts from the query's own state (then the shared steps — the first,
        and all of them without the gate — take one ``[B, 1, K]`` product per query instead of ``G``).

        Returns logits ``[B, G, S, K]`` (chosen = ``mask_value``, padded = ``-inf``) and greedy picks ``[B, G, S]``
        (``None`` when ``need_preds`` is False and the labels cover every step: teacher-forced training).
        Teacher forcing on ``labels`` for ``t < T``; the greedy pick afterwards.
        """
        G = self._check_unroll(state, valid, labels, steps, policy_temperature)
        padded = ~valid.unsqueeze(1)  # [B, 1, K]
        chosen = None  # [B, G, K] bool once something is chosen
        all_logits, all_preds = [], []
        for t in range(steps):
            logits = self._step_logits(state, cand_hat, padded, chosen, G, policy_temperature)
            teacher = labels is not None and t < labels.shape[2]
            pred = None
            if need_preds or not teacher:
                # argmax with chosen at -inf: identical to the reference's argmax, but can never repeat an item
                pred = (logits if chosen is None else logits.masked_fill(chosen, float("-inf"))).argmax(dim=-1)
                all_preds.append(pred)
            all_logits.append(logits)
            if t < steps - 1:
                state, chosen = self._advance(state, cand_hat, chosen, labels[:, :, t] if teacher else pred)
        preds = torch.stack(all_preds, dim=2) if len(all_preds) == steps else None
        return torch.stack(all_logits, dim=2), preds

    def _check_unroll(self, state: torch.Tensor, valid: torch.Tensor, labels: Optional[torch.Tensor], steps: int,
                      policy_temperature: float) -> int:
        """Validate the ``_unroll`` arguments; return ``G``, the sequences per query."""
        if not policy_temperature > 0:
            raise LeverPlusInputError(
                f"policy_temperature must be > 0, got {policy_temperature}", field="policy_temperature"
            )
        G0 = state.shape[1]
        G = labels.shape[1] if labels is not None else G0
        if G0 not in (1, G):
            raise ValueError(f"state has {G0} rows per query, labels {G}")
        if steps < 1:
            raise LeverPlusInputError(f"shot_num must be >= 1, got {steps}", field="shot_num")
        if not self.check_inputs:
            return G
        n_valid = int(valid.sum(dim=1).min())
        if steps > n_valid:
            raise LeverPlusInputError(
                f"cannot pick {steps} distinct items from a pool with {n_valid} valid entries",
                field="shot_num",
                fix="lower the shot number or enlarge the candidate pool",
            )
        return G

    def _step_logits(self, state: torch.Tensor, cand_hat: torch.Tensor, padded: torch.Tensor,
                     chosen: Optional[torch.Tensor], G: int, policy_temperature: float) -> torch.Tensor:
        """One pointer step's logits ``[B, G, K]``: ``s·ĉ / temperature / policy_temperature``, padded at ``-inf``,
        chosen at ``mask_value``."""
        B, K = cand_hat.shape[0], cand_hat.shape[1]
        logits = torch.bmm(state, cand_hat.transpose(1, 2)) / self.temperature  # [B, G0 or G, K]
        if policy_temperature != 1.0:
            logits = logits / policy_temperature
        logits = logits.masked_fill(padded, float("-inf"))
        if logits.shape[1] != G:
            logits = logits.expand(B, G, K)
        return logits if chosen is None else logits.masked_fill(chosen, self.mask_value)

    def _advance(self, state: torch.Tensor, cand_hat: torch.Tensor, chosen: Optional[torch.Tensor],
                 idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mark the picks ``idx [B, G]`` as chosen and move the state through the gate (when it is on)."""
        B, G = idx.shape
        K, H = cand_hat.shape[1], cand_hat.shape[2]
        if chosen is None:
            chosen = torch.zeros(B, G, K, dtype=torch.bool, device=state.device)
        chosen = chosen.scatter(2, idx.unsqueeze(-1), True)
        if self.use_query_update_gate:
            picked = torch.gather(cand_hat, 1, idx.unsqueeze(-1).expand(B, G, H))  # [B, G, H]
            state = self.gate_update(state.expand(B, G, H), picked)
        return state, chosen

    def forward(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        shot_num: Optional[int] = None,
        cand_mask: Optional[torch.Tensor] = None,
        policy_temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive selection (reference#model-forward step 4): ``(logits [B, S, K], predictions [B, S])``.

        ``S = shot_num`` if given, else ``labels.shape[1]``. Teacher forcing on ``labels [B, S']`` for t < S'.
        ``policy_temperature`` divides the logits after the model temperature (1.0 = the reference policy).
        """
        if labels is None and shot_num is None:
            raise LeverPlusInputError("pass labels or shot_num", field="shot_num")
        state, cand_hat, valid = self._encode(query_emb, cand_emb, cand_mask)
        labels3 = None
        if labels is not None:
            if labels.dim() != 2 or labels.shape[0] != query_emb.shape[0]:
                raise LeverPlusInputError(f"expected labels [B, S], got {tuple(labels.shape)}", field="labels")
            labels3 = self._check_labels(labels.unsqueeze(1), valid)
        steps = shot_num if shot_num is not None else labels.shape[1]
        logits, preds = self._unroll(state.unsqueeze(1), cand_hat, valid, labels3, steps, policy_temperature)
        return logits.squeeze(1), preds.squeeze(1)

    def _group_logits(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: torch.Tensor,
        cand_mask: Optional[torch.Tensor],
        policy_temperature: float,
        per_member_dropout: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits ``[B, G, S, K]`` for every group member; also the labels and validity mask."""
        if labels.dim() != 3 or labels.shape[0] != query_emb.shape[0]:
            raise LeverPlusInputError(f"expected labels [B, G, S], got {tuple(labels.shape)}", field="labels")
        B, G, S = labels.shape
        if per_member_dropout and self.training:
            # reference path: the query and pool tiled over the group, so each member draws its own dropout
            state, cand_hat, valid = self._encode(query_emb, cand_emb, cand_mask, repeat=G)
            K = cand_hat.shape[1]
            flat = self._check_labels(labels.reshape(B * G, 1, S), valid)
            logits, _ = self._unroll(state.unsqueeze(1), cand_hat, valid, flat, S, policy_temperature, need_preds=False)
            return logits.reshape(B, G, S, K), flat.reshape(B, G, S), valid.reshape(B, G, K)[:, 0]
        state, cand_hat, valid = self._encode(query_emb, cand_emb, cand_mask)  # once per query, shared by the group
        labels = self._check_labels(labels, valid)
        logits, _ = self._unroll(state.unsqueeze(1), cand_hat, valid, labels, S, policy_temperature, need_preds=False)
        return logits, labels, valid

    def sequence_log_probs(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: torch.Tensor,
        cand_mask: Optional[torch.Tensor] = None,
        *,
        policy_temperature: float = 1.0,
        per_member_dropout: bool = False,
    ) -> torch.Tensor:
        """``log π(a | q, C) = Σ_t log_softmax(logits_t)[a_t]`` for labels ``[B, G, S]`` -> ``[B, G]`` (reference#sequence-log-prob).

        Teacher-forced on each member's own labels (mask and gate follow ``a``); chosen entries (-100) stay in
        the normaliser, padded ones (-inf) do not. The query is encoded once and shared by its ``G`` members,
        which equals evaluating each member alone whenever dropout is inactive.

        per_member_dropout: [QUIRK reference#sequence-log-prob] in train mode the reference tiled q and C over the group, so every
            member drew its own dropout mask. True reproduces that (G times the work after the input projection); our
            default False shares one mask per query.
        """
        logits, labels, _ = self._group_logits(
            query_emb, cand_emb, labels, cand_mask, policy_temperature, per_member_dropout
        )
        logp = torch.log_softmax(logits, dim=-1)
        return torch.gather(logp, 3, labels.unsqueeze(-1)).squeeze(-1).sum(dim=-1)

    def sequence_nll(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: torch.Tensor,
        cand_mask: Optional[torch.Tensor] = None,
        *,
        label_smoothing: Optional[float] = None,
        clamp_min: float = -100.0,
        per_member_dropout: bool = False,
    ) -> torch.Tensor:
        """Per-member cross-entropy summed over steps, ``[B, G]`` (reference RCE/SFT loss terms, reference#rce-loss).

        ``Σ_t CE(clamp(logits_t, min=clamp_min), a_t, label_smoothing)``; with smoothing ε the per-step term is
        ``(1−ε)(−log p_a) + ε·mean_k(−log p_k)`` over the *valid* entries only, so padding never enters.
        ``label_smoothing=None`` uses the model's ``label_smoothing``; ``clamp_min`` is the reference -100.
        With ε = 0 this equals ``-sequence_log_probs``.
        """
        eps = self.label_smoothing if label_smoothing is None else float(label_smoothing)
        if not 0.0 <= eps <= 1.0:
            raise LeverPlusInputError(f"label_smoothing must be in [0, 1], got {eps}", field="label_smoothing")
        logits, labels, valid = self._group_logits(query_emb, cand_emb, labels, cand_mask, 1.0, per_member_dropout)
        pad = ~valid[:, None, None, :]  # [B, 1, 1, K]
        logits = logits.clamp(min=clamp_min).masked_fill(pad, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        nll = -torch.gather(logp, 3, labels.unsqueeze(-1)).squeeze(-1)  # [B, G, S]
        if eps > 0:
            n_valid = valid.sum(dim=1).to(logp.dtype)[:, None, None]
            uniform = -logp.masked_fill(pad, 0.0).sum(dim=-1) / n_valid
            nll = (1 - eps) * nll + eps * uniform
        return nll.sum(dim=-1)

    # ------------------------------------------------------------------ evaluation on item tables

    @torch.no_grad()
    def item_table(self, embeddings: torch.Tensor) -> ItemTable:
        """Project every item once, without dropout (see :class:`ItemTable`)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.d_model:
            raise LeverPlusInputError(
                f"expected embeddings [N, {self.d_model}], got {tuple(embeddings.shape)}", field="embeddings"
            )
        if not torch.isfinite(embeddings).all():
            raise LeverPlusInputError("contains NaN or inf", field="embeddings", fix="re-export the embeddings")
        c = self.input_proj(embeddings)
        return ItemTable(c=c, cand_hat=F.normalize(self.cand_proj(c), p=2, dim=-1))

    def _encode_indexed(
        self, query_emb: torch.Tensor, pool_idx: torch.Tensor, cand_mask: Optional[torch.Tensor], table: ItemTable
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_encode`` in eval mode for pools given as item rows ``pool_idx [B, K]`` of ``table``."""
        if self.training:
            raise RuntimeError("item tables hold eval-mode features: call model.eval() first")
        if pool_idx.dim() != 2 or query_emb.dim() != 2 or pool_idx.shape[0] != query_emb.shape[0]:
            raise LeverPlusInputError(
                f"expected query_emb [B, d] and pool_idx [B, K], got {tuple(query_emb.shape)} and "
                f"{tuple(pool_idx.shape)}",
                field="pool_idx",
            )
        if pool_idx.numel() and (int(pool_idx.min()) < 0 or int(pool_idx.max()) >= table.num_items):
            raise LeverPlusInputError(
                f"pool ids must lie in [0, {table.num_items}), got min {int(pool_idx.min())} max {int(pool_idx.max())}",
                field="pool_idx",
            )
        if query_emb.shape[1] != self.d_model or not torch.isfinite(query_emb).all():
            raise LeverPlusInputError(
                f"query_emb must be finite with last dimension {self.d_model}, got {tuple(query_emb.shape)}",
                field="query_emb",
            )
        valid = self._check_mask(cand_mask, *pool_idx.shape, device=pool_idx.device)
        c = F.embedding(pool_idx, table.c)  # table.c[pool_idx], [B, K, H] (a row gather ~4x faster than indexing)
        return self._query_state(self.input_proj(query_emb), c, valid), F.embedding(pool_idx, table.cand_hat), valid

    @torch.no_grad()
    def greedy_indexed(
        self,
        query_emb: torch.Tensor,
        pool_idx: torch.Tensor,
        shot_num: int,
        table: ItemTable,
        cand_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:meth:`greedy` for pools given as item rows of ``table`` -> positions into ``pool_idx`` ``[B, shot_num]``."""
        with eval_mode(self):
            state, cand_hat, valid = self._encode_indexed(query_emb, pool_idx, cand_mask, table)
            _, preds = self._unroll(state.unsqueeze(1), cand_hat, valid, None, shot_num, 1.0)
        return preds.squeeze(1)

    @torch.no_grad()
    def sequence_log_probs_indexed(
        self,
        query_emb: torch.Tensor,
        pool_idx: torch.Tensor,
        labels: torch.Tensor,
        table: ItemTable,
        cand_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Eval-mode :meth:`sequence_log_probs` for pools given as item rows of ``table``: ``[B, G]``."""
        with eval_mode(self):
            state, cand_hat, valid = self._encode_indexed(query_emb, pool_idx, cand_mask, table)
            if labels.dim() != 3 or labels.shape[0] != query_emb.shape[0]:
                raise LeverPlusInputError(f"expected labels [B, G, S], got {tuple(labels.shape)}", field="labels")
            labels = self._check_labels(labels, valid)
            logits, _ = self._unroll(state.unsqueeze(1), cand_hat, valid, labels, labels.shape[2], 1.0,
                                     need_preds=False)
        logp = torch.log_softmax(logits, dim=-1)
        return torch.gather(logp, 3, labels.unsqueeze(-1)).squeeze(-1).sum(dim=-1)

    @torch.no_grad()
    def greedy(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        shot_num: int,
        cand_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Greedy masked decoding in eval mode -> positions ``[B, shot_num]``; never repeats an item.

        Raises if ``shot_num`` exceeds the number of valid pool entries (the reference silently repeated, reference#defect-c1).
        The previous train/eval mode is restored afterwards.
        """
        with eval_mode(self):
            _, preds = self.forward(query_emb, cand_emb, shot_num=shot_num, cand_mask=cand_mask)
        return preds

    @torch.no_grad()
    def step_logits_fn(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        *,
        policy_temperature: float = 1.0,
        static_query: bool = False,
    ) -> StepFn:
        """A ``decoding.StepFn`` for one query ``[d]`` and pool ``[K, d]``, for beam search / sampling (reference#rldata-candidates).

        Encodes once in eval mode; each call replays the gate over the prefix (teacher forcing) and returns the
        next-step logits ``[K]`` with prefix items at ``mask_value``. Uses the weights as they are at call time.

        static_query: [QUIRK reference#rldata-candidates] the reference RL generator's ``compute_step_logits`` had no gate update
            (True reproduces it); our default False uses the model's own forward, gate included.
        """
        if query_emb.dim() != 1 or cand_emb.dim() != 2:
            raise LeverPlusInputError(
                f"expected query_emb [d] and cand_emb [K, d], got {tuple(query_emb.shape)} and {tuple(cand_emb.shape)}",
                field="query_emb/cand_emb",
            )
        if not policy_temperature > 0:
            raise LeverPlusInputError(
                f"policy_temperature must be > 0, got {policy_temperature}", field="policy_temperature"
            )
        with eval_mode(self):
            state0, cand_hat, _ = self._encode(query_emb.unsqueeze(0), cand_emb.unsqueeze(0), None)
        state0, cand_hat = state0[0], cand_hat[0]  # [H], [K, H]
        K = cand_hat.shape[0]

        def step(prefix) -> torch.Tensor:
            prefix = [int(i) for i in prefix]
            if any(not 0 <= i < K for i in prefix):
                raise LeverPlusInputError(f"prefix {prefix} has positions outside [0, {K})", field="prefix")
            with torch.no_grad():
                state = state0
                if not static_query:
                    for i in prefix:
                        state = self.gate_update(state, cand_hat[i])
                logits = (cand_hat @ state) / self.temperature
                if policy_temperature != 1.0:
                    logits = logits / policy_temperature
                if prefix:
                    logits[prefix] = self.mask_value
            return logits

        return step

