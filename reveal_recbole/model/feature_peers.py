"""RecBole's feature-aware sequential models (SASRecF, FDSA, GRU4RecF) reading our item features.

Papers: SASRecF is RecBole's SASRec (Kang and McAuley, ICDM 2018) with item attribute embeddings
concatenated to the item embedding; FDSA: Zhang et al., "Feature-level Deeper Self-Attention
Network for Sequential Recommendation", IJCAI 2019; GRU4RecF: Hidasi et al., "Parallel Recurrent
Neural Network Architectures for Feature-rich Session-based Recommendations", RecSys 2016.

Each model here *is* RecBole's (a subclass, registered under RecBole's name in this package's
lookups only), reading each modality's features as the ``float_seq`` item field
``<modality>_feature`` (:mod:`reveal_recbole.data.feature_fields`). One thing differs: how a
dense ``float_seq`` field is embedded. RecBole 1.2.1's ``FeatureSeqEmbLayer`` cannot embed one:

* a ``float_seq`` field left out of ``numerical_features`` is skipped (not embedded at all): the
  models then fail with ``torch.cat(): expected a non-empty list`` when it is their only field;
* in ``numerical_features``, every value is stored as the pair ``(x_j, 1)`` and embedded as
  ``x_j * e_1`` with one vector ``e_1`` for every dimension, then pooled over the dimensions: a
  512-d feature collapses to one number times ``e_1`` (``(sum_j x_j) e_1`` with SASRecF's and
  GRU4RecF's ``sum`` pooling, the mean with FDSA's ``mean``; RecBole issue #2043), through a
  ``batch x length x 512 x hidden`` tensor; and SASRecF sizes its input layer for ``num(field)`` = 2
  vectors per such field while the layer gives one (``mat1 and mat2 shapes cannot be multiplied``,
  RecBole issue #1983).

:class:`DenseFeatureSeqEmbLayer` (a ``FeatureSeqEmbLayer`` subclass; token, token_seq and numerical
fields stay RecBole's) embeds each dense field as one vector, ``W x + b``: one linear layer per
field, applied to the batch's distinct items only. ``pooling_mode`` applies to RecBole's sequence
fields; a dense field is one vector, not a bag to pool. The models score candidates with their
ID table, as RecBole's do: features reach the score through the input sequence only.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from recbole.model.init import xavier_normal_initialization
from recbole.model.layers import FeatureSeqEmbLayer
from recbole.model.sequential_recommender import FDSA as RecBoleFDSA
from recbole.model.sequential_recommender import GRU4RecF as RecBoleGRU4RecF
from recbole.model.sequential_recommender import SASRecF as RecBoleSASRecF
from recbole.utils import FeatureType
from torch import nn

from reveal_recbole.data.feature_fields import FIELD_SUFFIX, FeatureFieldsDataset, feature_field, selected_features
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.item_encoder import masked_modalities
from reveal_recbole.registry import register_model
from reveal_recbole.trainer import REVEALTrainer


def dense_fields(dataset, fields: Iterable[str]) -> list[str]:
    """The ``float_seq`` fields among ``fields`` that RecBole would not embed (not in ``numerical_features``)."""
    numerical = dataset.config["numerical_features"] or []
    return [f for f in fields if dataset.field2type.get(f) == FeatureType.FLOAT_SEQ and f not in numerical]


class DenseFeatureSeqEmbLayer(FeatureSeqEmbLayer):
    """RecBole's item feature layer, plus dense ``float_seq`` fields embedded as ``W x + b`` (one vector each).

    Its output is RecBole's ``(sparse, dense)`` pair; each dense field adds one ``embedding_size``
    vector per position to ``dense["item"]`` (after RecBole's own float fields). :meth:`masking`
    replaces a modality's rows with zeros, the input of an item without a feature row.
    """

    def __init__(self, dataset, embedding_size, selected_features, pooling_mode, device):
        super().__init__(dataset, embedding_size, selected_features, pooling_mode, device)
        self.masked_modalities: frozenset[str] = frozenset()

    def get_fields_name_dim(self):
        super().get_fields_name_dim()
        self.dense_field_names = dense_fields(self.dataset, self.field_names["item"])
        self.dense_field_dims = [self.dataset.field2seqlen[f] for f in self.dense_field_names]
        self.num_feature_field["item"] += len(self.dense_field_names)

    def get_embedding(self):
        super().get_embedding()
        self.dense_projections = nn.ModuleDict(
            {f: nn.Linear(dim, self.embedding_size) for f, dim in zip(self.dense_field_names, self.dense_field_dims)}
        ).to(self.device)

    # ----------------------------------------------------------------- modalities (the REVEAL encoder's names)
    @property
    def modalities(self) -> list[str]:
        return [f[: -len(FIELD_SUFFIX)] for f in self.dense_field_names if f.endswith(FIELD_SUFFIX)]

    def masking(self, modalities: Iterable[str]) -> contextlib.AbstractContextManager:
        """Within the block, the named modalities' rows are zeros (as for items without a feature)."""
        return masked_modalities(self, modalities)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return list(self.dense_projections[feature_field(modality)].parameters())

    # ----------------------------------------------------------------- forward
    def embed_dense_fields(self, item_idx: torch.Tensor) -> torch.Tensor | None:
        """``(*item_idx.shape, fields, embedding_size)``: each dense field's ``W x + b`` at each position."""
        if not self.dense_field_names:
            return None
        items, inverse = torch.unique(item_idx, return_inverse=True)  # project each distinct item once
        vectors = []
        for field in self.dense_field_names:
            rows = self.item_feat[field][items]
            if field[: -len(FIELD_SUFFIX)] in self.masked_modalities:
                rows = torch.zeros_like(rows)
            vectors.append(self.dense_projections[field](rows)[inverse])
        return torch.stack(vectors, dim=-2)

    def embed_input_fields(self, user_idx, item_idx):
        sparse, dense = super().embed_input_fields(user_idx, item_idx)
        projected = self.embed_dense_fields(item_idx)
        if projected is not None:
            dense["item"] = projected if dense["item"] is None else torch.cat([dense["item"], projected], dim=-2)
        return sparse, dense


class FeatureAwareItemTable(nn.Embedding):
    """The model's ID table (the same parameter), which also answers for the model's feature inputs.

    AVL, the masked-modality diagnostics and the target buckets reach a model's modalities through
    ``model.item_embedding`` (``modalities``, ``masking``, ``modality_parameters``, ``score_with``), as
    on the REVEAL encoder. Here the features live in ``feature_embed_layer``; this table delegates to
    it. ``score_with = "id"``: these models score candidates with the ID rows, so a cold item's
    features never reach its own score (only a sequence that holds it).
    """

    score_with = "id"

    def __init__(self, table: nn.Embedding, features: DenseFeatureSeqEmbLayer):
        super().__init__(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx)
        self.weight = table.weight  # the backbone's own table, its initialisation kept
        self.__dict__["features"] = features  # a reference, not a submodule: the layer belongs to the model

    @property
    def modalities(self) -> list[str]:
        return self.features.modalities

    def masking(self, modalities: Iterable[str]):
        return self.features.masking(modalities)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return self.features.modality_parameters(modality)


class DenseFeatureFields:
    """Mixin placed before RecBole's SASRecF, FDSA or GRU4RecF: item fields through :class:`DenseFeatureSeqEmbLayer`.

    ``selected_features: ~`` (this package's default for them) means the configured modalities'
    fields. The layer (and the width of whatever reads its output) is rebuilt after RecBole's
    ``__init__``, initialised as the model initialises its layers. With the REVEAL trainer, AVL
    (``avl: True``) re-weights the image projection's gradients as it does the REVEAL encoder's,
    masking a modality by zeroing its rows.
    """

    def __init__(self, config, dataset):
        config["selected_features"] = selected_features(config)
        missing = [f for f in config["selected_features"] if f not in dataset.field2type]
        if missing:
            modalities = ", ".join(f for f in dataset.field2type if f.endswith(FIELD_SUFFIX)) or "none"
            raise ConfigError(
                f"selected_features names {missing}, not item fields of {config['dataset']!r}: the features' "
                f"fields are <modality>{FIELD_SUFFIX} for each of modalities (here: {modalities}); other fields "
                "come from the .item file (load_col: {item: [item_id, ...]})"
            )
        super().__init__(config, dataset)
        layer = DenseFeatureSeqEmbLayer(
            dataset, self.feature_embed_layer.embedding_size, self.selected_features, self.pooling_mode, self.device
        )
        self.feature_embed_layer = layer
        self.fit_feature_width(layer.num_feature_field["item"])
        layer.apply(self.initialise)
        self.item_embedding = FeatureAwareItemTable(self.item_embedding, layer)
        # AVL's running means (mean L_v, mean L_t, count), as on the REVEAL models: checkpoints carry them
        self.register_buffer("avl_running_losses", torch.zeros(3, dtype=torch.float64))
        # RecBole lists the layer as an "other parameter", so every checkpoint pickles it with its dataset;
        # its learned parts are in the state dict and its tables come from the dataset when the model is built
        self.other_parameter_name = []

    def initialise(self, module: nn.Module) -> None:
        init = getattr(self, "_init_weights", None)
        (init or xavier_normal_initialization)(module)

    def fit_feature_width(self, fields: int) -> None:
        """Resize what reads the concatenated ``fields`` feature vectors (RecBole counts them wrongly for float_seq)."""
        self.num_feature_field = fields


class SASRecF(DenseFeatureFields, RecBoleSASRecF):
    """RecBole's SASRecF; dense feature fields embedded as one ``W x + b`` vector each."""

    def fit_feature_width(self, fields: int) -> None:
        super().fit_feature_width(fields)
        width = self.hidden_size * (1 + fields)
        if self.concat_layer.in_features != width:
            self.concat_layer = nn.Linear(width, self.hidden_size)
            self.concat_layer.apply(self.initialise)


class FDSA(DenseFeatureFields, RecBoleFDSA):
    """RecBole's FDSA (attention over the feature vectors, so no width depends on their count)."""


class GRU4RecF(DenseFeatureFields, RecBoleGRU4RecF):
    """RecBole's GRU4RecF; dense feature fields embedded as one ``W x + b`` vector each."""

    def fit_feature_width(self, fields: int) -> None:
        super().fit_feature_width(fields)
        width = self.embedding_size * fields
        if self.feature_gru_layers.input_size != width:
            self.feature_gru_layers = nn.GRU(
                input_size=width, hidden_size=self.hidden_size, num_layers=self.num_layers, bias=False, batch_first=True
            )
            self.feature_gru_layers.apply(self.initialise)


FEATURE_PEERS = (SASRecF, FDSA, GRU4RecF)
for _model in FEATURE_PEERS:
    register_model(_model, FeatureFieldsDataset, REVEALTrainer)
