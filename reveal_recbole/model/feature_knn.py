"""FeatureKNN: a training-free baseline, next item = the nearest neighbours of the last item(s) in feature space.

It shows what the item features give without any learning, on the same split and RecBole
full-ranking evaluator as every other model (``--model=SASRec,FeatureKNN,SASRecREVEAL``).

    score(u, i) = sum_j w_j * mean_m cos(f_m[s_j], f_m[i]),   w_j = decay**j / sum_j' decay**j'

over the user's last ``knn_last_items`` items ``s_0`` (the last), ``s_1``, ... and the configured
``modalities`` ``m``. Several modalities are fused by averaging their cosine similarities: with
unit-normalised rows that is the dot product of the concatenated rows divided by the number of
modalities (the cosine of the concatenations when every item has every feature). An item without a
feature row has cosine 0 in that modality.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.trainer import TraditionalTrainer
from recbole.utils import InputType
from torch import nn

from reveal_recbole.data.dataset import MultimodalSequentialDataset, configured_modalities
from reveal_recbole.errors import ConfigError
from reveal_recbole.registry import register_model
from reveal_recbole.trainer.base import extended_trainer


class FeatureKNN(SequentialRecommender):
    """Cosine nearest neighbours of the recency-weighted last item(s), per modality or fused."""

    input_type = InputType.POINTWISE  # as RecBole's Pop: no loss_type, no negatives

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        modalities = configured_modalities(config)
        if not modalities:
            raise ConfigError("FeatureKNN needs at least one modality: set modalities, e.g. [image, text] or [text]")
        self.last_items = config["knn_last_items"]
        if isinstance(self.last_items, bool) or not isinstance(self.last_items, int) or self.last_items < 1:
            raise ConfigError(f"knn_last_items must be an integer >= 1, got {config['knn_last_items']!r}")
        decay = config["knn_recency_decay"]
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ConfigError(f"knn_recency_decay must be a number in (0, 1], got {decay!r}")
        self.exclude_query = config["knn_exclude_query"]
        if not isinstance(self.exclude_query, bool):
            raise ConfigError(f"knn_exclude_query must be True or False, got {self.exclude_query!r}")
        features = getattr(dataset, "item_features", None)
        if features is None:
            raise TypeError(f"FeatureKNN needs item features, but {type(dataset).__name__} has none: "
                            "build the dataset with reveal_recbole.data.create_dataset")

        # unit rows per modality, rebuilt from the features, not saved; rows normalised at load are the
        # dataset's own (no copy: at 1M items x 1,664-d a concatenated copy was 6.7 GB more)
        self.modalities = modalities
        for m in modalities:
            rows = features[m].values if features[m].unit_norm else F.normalize(features[m].values.float(), dim=1)
            self.register_buffer(f"unit_rows_{m}", rows, persistent=False)
        self.register_buffer("recency_weights", decay ** torch.arange(self.last_items, dtype=torch.float),
                             persistent=False)
        self.zero = nn.Parameter(torch.zeros(()))  # RecBole's trainer needs a parameter to optimise

    def query_items(self, item_seq, item_seq_len) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``knn_last_items`` items (the last first; 0 past the sequence start) and their weights."""
        positions = item_seq_len.unsqueeze(1) - 1 - torch.arange(self.last_items, device=item_seq.device)
        present = positions >= 0
        items = torch.where(present, item_seq.gather(1, positions.clamp(min=0)), 0)
        weights = self.recency_weights * present
        return items, weights / weights.sum(1, keepdim=True)

    def item_rows(self) -> list[torch.Tensor]:
        return [getattr(self, f"unit_rows_{m}") for m in self.modalities]

    def forward(self, item_seq, item_seq_len) -> list[torch.Tensor]:
        """Per modality, the weighted mean of the query items' rows over the number of modalities: the sum of
        its dot products with an item's rows is that item's score."""
        items, weights = self.query_items(item_seq, item_seq_len)
        return [(weights.unsqueeze(2) * rows[items]).sum(1) / len(self.modalities) for rows in self.item_rows()]

    def calculate_loss(self, interaction):
        return self.zero * 0.0  # nothing to learn

    def predict(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        item = interaction[self.ITEM_ID]
        queries = self.forward(item_seq, item_seq_len)
        scores = sum((query * rows[item]).sum(1) for query, rows in zip(queries, self.item_rows()))
        if self.exclude_query:
            query, _ = self.query_items(item_seq, item_seq_len)
            scores = scores.masked_fill((query == item.unsqueeze(1)).any(1), -math.inf)
        return scores

    def full_sort_predict(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        queries = self.forward(item_seq, item_seq_len)
        scores = sum(query @ rows.T for query, rows in zip(queries, self.item_rows()))
        if self.exclude_query:
            query, _ = self.query_items(item_seq, item_seq_len)
            scores = scores.scatter(1, query, -math.inf)  # column 0 (padding) is RecBole's -inf anyway
        return scores


# RecBole's trainer for its training-free models (Pop, ItemKNN): one epoch, whatever ``epochs`` says
register_model(FeatureKNN, MultimodalSequentialDataset, extended_trainer(TraditionalTrainer))
