"""The REVEAL item encoder: one module that stands in for a backbone's ``item_embedding``.

Sequential backbones in RecBole embed items in two ways: ``item_embedding(ids)`` for the input
sequence (and BPR's positive/negative items) and ``item_embedding.weight`` for full-ranking
scores. The encoder answers both with the same fused representation

    e_i = fuse(E_id[i], drop(W_v f_v[i] + b_v), drop(W_t f_t[i] + b_t))

so a backbone runs unchanged. The ID table is the backbone's own ``nn.Embedding`` (its
initialisation is kept), the feature tables come from the dataset's aligned feature files.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from reveal_recbole.data.features import ItemFeatures
from reveal_recbole.errors import ConfigError

FUSIONS = ("sum", "concat", "gated")
MISSING_FEATURE_MODES = ("zero", "learned")


class REVEALItemEncoder(nn.Module):
    """Fuses an ID embedding with projected per-modality item features.

    Args:
        id_embedding: the backbone's item table; its row count (e.g. BERT4Rec's extra mask
            token) sets the encoder's; rows beyond the features (the mask token) count as items
            without a feature. The padding row's output is kept at zero.
        item_features: aligned features per modality (``dataset.item_features``).
        fusion: ``sum`` (ID + modalities), ``concat`` (linear map of the concatenation) or
            ``gated`` (softmax weights over the parts, scored per item by each part's own head).
        feature_trainable: fine-tune the feature tables (as the REVEAL authors do) or freeze them.
        feature_dropout: dropout on each projected modality embedding.
        missing_feature: ``zero`` input or a ``learned`` vector for items without a feature.
        feature_norm: ``l2`` normalises each feature row at load time; ``none`` keeps it as is.
    """

    def __init__(
        self,
        id_embedding: nn.Embedding,
        item_features: Mapping[str, ItemFeatures],
        fusion: str = "sum",
        feature_trainable: bool = True,
        feature_dropout: float = 0.0,
        missing_feature: str = "zero",
        feature_norm: str = "l2",
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if missing_feature not in MISSING_FEATURE_MODES:
            raise ConfigError(f"missing_feature must be one of {MISSING_FEATURE_MODES}, got {missing_feature!r}")
        if feature_norm not in ("l2", "none"):
            raise ConfigError(f"feature_norm must be 'l2' or 'none', got {feature_norm!r}")
        self.id_embedding = id_embedding
        self.num_embeddings = id_embedding.num_embeddings
        self.embedding_dim = id_embedding.embedding_dim
        self.padding_idx = id_embedding.padding_idx
        self.fusion = fusion
        self.modalities = tuple(item_features)
        self.masked_modalities: frozenset[str] = frozenset()
        self._table_cache: tuple[tuple, torch.Tensor] | None = None
        self._share_depth = 0

        self.feature_tables = nn.ParameterDict()
        self.projections = nn.ModuleDict()
        self.missing_vectors = nn.ParameterDict()
        for modality, features in item_features.items():
            values, present = self._fit_rows(features)
            if feature_norm == "l2":
                values = F.normalize(values, dim=1) * present.unsqueeze(1)
            self.feature_tables[modality] = nn.Parameter(values, requires_grad=feature_trainable)
            self.register_buffer(f"present_{modality}", present)
            self.projections[modality] = nn.Linear(features.dim, self.embedding_dim)
            if missing_feature == "learned":
                self.missing_vectors[modality] = nn.Parameter(torch.zeros(features.dim))
        self.dropout = nn.Dropout(feature_dropout)
        parts = 1 + len(self.modalities)
        if fusion == "concat" and self.modalities:
            self.concat_projection = nn.Linear(parts * self.embedding_dim, self.embedding_dim)
        if fusion == "gated":
            self.gate_heads = nn.ModuleDict(
                {name: nn.Linear(self.embedding_dim, 1) for name in ("id",) + self.modalities}
            )
        self.register_buffer("_padding_index", torch.tensor([self.padding_idx or 0]), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.clear_cache())

    def _fit_rows(self, features: ItemFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (or cut) feature rows to the ID table's size; extra rows have no feature."""
        values = torch.zeros(self.num_embeddings, features.dim)
        present = torch.zeros(self.num_embeddings, dtype=torch.bool)
        rows = min(self.num_embeddings, features.values.shape[0])
        values[:rows] = features.values[:rows]
        present[:rows] = features.present[:rows]
        return values, present

    # ----------------------------------------------------------------- what AVL needs
    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """Parameters that only one modality's branch uses (e.g. the 'visual parameters' of AVL)."""
        if modality not in self.modalities:
            raise KeyError(f"modality {modality!r} not in encoder modalities {self.modalities}")
        params = [self.feature_tables[modality], *self.projections[modality].parameters()]
        if modality in self.missing_vectors:
            params.append(self.missing_vectors[modality])
        if self.fusion == "gated":
            params.extend(self.gate_heads[modality].parameters())
        return [p for p in params if p.requires_grad]

    @contextlib.contextmanager
    def masking(self, modalities: Iterable[str]) -> Iterator[None]:
        """Zero the input features of ``modalities`` for the forward passes inside the block."""
        modalities = frozenset(modalities)
        unknown = modalities - set(self.modalities)
        if unknown:
            raise KeyError(f"cannot mask {sorted(unknown)}: encoder modalities are {self.modalities}")
        previous = self.masked_modalities
        self.masked_modalities = previous | modalities
        try:
            yield
        finally:
            self.masked_modalities = previous

    # ----------------------------------------------------------------- the fused table
    def modality_input(self, modality: str) -> torch.Tensor:
        """The feature rows fed to a modality's projection: zeros when masked."""
        table = self.feature_tables[modality]
        if modality in self.masked_modalities:
            return torch.zeros_like(table)
        if modality in self.missing_vectors:
            present = getattr(self, f"present_{modality}").unsqueeze(1)
            return torch.where(present, table, self.missing_vectors[modality])
        return table

    def fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0]
        if self.fusion == "sum":
            return torch.stack(parts).sum(0)
        if self.fusion == "concat":
            return self.concat_projection(torch.cat(parts, dim=-1))
        names = ("id",) + self.modalities
        logits = torch.cat([self.gate_heads[n](p) for n, p in zip(names, parts)], dim=-1)
        weights = torch.softmax(logits, dim=-1)
        return (torch.stack(parts, dim=-1) * weights.unsqueeze(-2)).sum(-1)

    def compute_table(self) -> torch.Tensor:
        parts = [self.id_embedding.weight]
        for modality in self.modalities:
            parts.append(self.dropout(self.projections[modality](self.modality_input(modality))))
        table = self.fuse(parts)
        if self.padding_idx is not None:  # keep RecBole's padding item at zero, as nn.Embedding does
            table = table.index_fill(0, self._padding_index, 0.0)
        return table

    def _cache_key(self) -> tuple:
        versions = tuple(p._version for p in self.parameters())
        return (versions, self.masked_modalities, self.training, torch.is_grad_enabled())

    def table(self) -> torch.Tensor:
        """All fused item embeddings; computed once per shared block, or per parameter state without grad."""
        if not self.modalities:
            return self.id_embedding.weight
        cacheable = self._share_depth > 0 or not torch.is_grad_enabled()
        if cacheable and self._table_cache is not None and self._table_cache[0] == self._cache_key():
            return self._table_cache[1]
        table = self.compute_table()
        if cacheable:
            self._table_cache = (self._cache_key(), table)
        return table

    @contextlib.contextmanager
    def shared_table(self) -> Iterator[None]:
        """Compute the fused table once for every use inside the block (one loss or score call)."""
        self._share_depth += 1
        try:
            yield
        finally:
            self._share_depth -= 1
            if self._share_depth == 0 and torch.is_grad_enabled():
                self.clear_cache()

    def clear_cache(self) -> None:
        self._table_cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    @property
    def weight(self) -> torch.Tensor:
        return self.table()

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        if not self.modalities:
            return self.id_embedding(item_ids)
        return F.embedding(item_ids, self.table())

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, fusion={self.fusion}"
