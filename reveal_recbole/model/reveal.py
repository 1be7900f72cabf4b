"""Turn any RecBole sequential recommender into its REVEAL version, without editing the backbone.

REVEAL: "Teach Multimodal Recommendation Model to See via Personalized Visual Extraction and
Adaptive Learning" (Li, Zhang, Ye, Dong, Jiang, 2026, arXiv 2606.09082).

A backbone qualifies when every item it embeds or scores goes through ``self.item_embedding``
(``item_embedding(ids)`` and ``item_embedding.weight``); ``model/contract.py`` checks this when the
class is built and again when the model is, and refuses the others with a ``BackboneError``
(README "Any backbone" lists RecBole's sequential models and their status)::

    from recbole.model.sequential_recommender import STAMP
    from reveal_recbole.model import make_reveal_model

    STAMPREVEAL = make_reveal_model(STAMP)          # registered as "STAMPREVEAL"
    run_reveal(model="STAMPREVEAL", dataset="scientific")
"""
from __future__ import annotations

from logging import getLogger

import torch
from torch import nn

from reveal_recbole.data.cold_start import training_item_counts
from reveal_recbole.data.dataset import configured_modalities
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.contract import check_backbone, check_backbone_data, check_item_tables, item_table
from reveal_recbole.model.item_encoder import COLD_ITEMS, REVEALItemEncoder, check_optional_width, encoder_settings
from reveal_recbole.model.neighbour_term import FeatureNeighbourTerm, neighbour_rows

# Backbones whose CE loss is exactly ``loss_fct(forward(item_seq, item_seq_len) @ item_embedding.weight.T, pos)``
# and whose full_sort_predict is the same product (RecBole 1.2.1's source), so the neighbour term is added to it
# and nothing of theirs is lost: FEARec and GCSAN add losses, CORE normalises, SINE and the CPR models score
# otherwise, BERT4Rec scores masked positions, Caser / NextItNet / SHAN take other inputs.
NEIGHBOUR_TERM_BACKBONES = frozenset(
    {"SASRec", "GRU4Rec", "NARM", "STAMP", "SRGNN", "LightSANs", "SASRecF", "GRU4RecF", "FDSA"}
)


class REVEALRecommender:
    """Mixin placed before a backbone class: swaps its ``item_embedding`` for the REVEAL encoder."""

    backbone: type

    def __init__(self, config, dataset):
        check_backbone_data(self.backbone, config, dataset)
        super().__init__(config, dataset)
        self.item_embedding = self.build_item_encoder(config, dataset, item_table(self))
        check_item_tables(self, dataset)  # aliases of the old table rebound; other item tables refused
        self.neighbour_term = self.build_neighbour_term(config, dataset)
        # AVL's running means (mean L_v, mean L_t, count): a buffer, so checkpoints carry them; float64
        # like the authors' Python floats (a float32 cumulative mean drifts once steps run into the 100,000s)
        self.register_buffer("avl_running_losses", torch.zeros(3, dtype=torch.float64))

    def build_item_encoder(self, config, dataset, id_embedding: nn.Embedding) -> REVEALItemEncoder:
        modalities = configured_modalities(config)
        available = getattr(dataset, "item_features", None)
        if modalities and available is None:
            raise TypeError(
                f"{type(self).__name__} needs item features, but {type(dataset).__name__} has none: "
                "build the dataset with reveal_recbole.data.create_dataset (MultimodalSequentialDataset)"
            )
        encoder = REVEALItemEncoder(
            id_embedding,
            {m: available[m] for m in modalities},
            fusion=config["fusion"],
            feature_trainable=config["feature_trainable"],
            feature_dropout=config["feature_dropout"],
            missing_feature=config["missing_feature"],
            feature_norm=config["feature_norm"],
            **self.cold_item_settings(config, dataset, id_embedding, modalities),
            **encoder_settings(config, modalities),
        )
        init_weights = getattr(self, "_init_weights", None)
        if init_weights is not None:  # new layers follow the backbone's own initialisation
            for name, child in encoder.named_children():
                if name != "id_embedding":
                    child.apply(init_weights)
        return encoder

    def cold_item_settings(self, config, dataset, id_embedding: nn.Embedding, modalities) -> dict:
        """The encoder's ``training_counts``, ``cold_items`` and ``cold_item_neighbours`` (config, training split).

        ``dataset`` is the training split (RecBole builds models on it). ``auto`` is ``neighbour``
        when that split leaves items without interactions and the model has features (logged),
        ``train`` otherwise.
        """
        mode = config["cold_items"] or "train"  # a checkpoint saved before this key: as it was trained
        if mode not in COLD_ITEMS:
            raise ConfigError(f"cold_items must be one of {COLD_ITEMS}, got {mode!r}")
        counts = torch.full((id_embedding.num_embeddings,), -1, dtype=torch.long)  # -1: not an item
        item_counts = torch.as_tensor(training_item_counts(dataset))
        n = min(len(item_counts), len(counts))
        counts[1:n] = item_counts[1:n]  # the padding row and rows past the items (BERT4Rec's mask token) stay -1
        cold = int((counts == 0).sum())
        resolved = ("neighbour" if cold and modalities else "train") if mode == "auto" else mode
        if cold and resolved != "train":
            getLogger().info(
                f"cold_items: {mode}{f' -> {resolved}' if mode == 'auto' else ''}: {cold} of {dataset.item_num - 1} "
                "items have no training interaction: left out of training, represented at evaluation by their "
                "features"
                + (" and what their nearest warm items learned (ID, feature fine-tuning)"
                   if resolved == "neighbour" else "")
            )
        neighbours = config["cold_item_neighbours"]
        return {"training_counts": counts, "cold_items": resolved,
                "cold_item_neighbours": 2 if neighbours is None else neighbours}

    def build_neighbour_term(self, config, dataset) -> FeatureNeighbourTerm | None:
        """``feature_neighbours``: the learned feature-neighbour score (``model/neighbour_term.py``).

        It is added where the backbone scores every item against ``forward(item_seq, item_seq_len)``
        with a CE loss (SASRec, GRU4Rec, NARM, ...). ``True`` refuses other backbones by name;
        ``auto`` leaves the term out of them (logged).
        """
        mode = config["feature_neighbours"]
        if mode not in (True, False, None, "auto"):
            raise ConfigError(f"feature_neighbours must be True, False or auto, got {mode!r}")
        if not mode:
            return None
        unsupported = self.neighbour_term_unsupported(config)
        if unsupported and mode == "auto":
            getLogger().info(f"feature_neighbours: auto -> off for {type(self).__name__}: {unsupported}")
            return None
        if unsupported:
            raise ConfigError(f"feature_neighbours: {unsupported}")
        width = config["feature_neighbours_width"]
        check_optional_width("feature_neighbours_width", width)
        encoder = self.item_embedding
        rows = {m: neighbour_rows(dataset.item_features[m], width) for m in encoder.modalities}
        return FeatureNeighbourTerm(rows, encoder.training_counts, encoder.embedding_dim)

    def neighbour_term_unsupported(self, config) -> str | None:
        """Why this model cannot take the neighbour term, or None."""
        if not self.item_embedding.modalities:
            return f"needs at least one modality ({type(self).__name__} has none)"
        if config["loss_type"] != "CE":
            return f"needs loss_type: CE (a score over every item), got {config['loss_type']!r}"
        if self.backbone.__name__ not in NEIGHBOUR_TERM_BACKBONES:
            return (f"{self.backbone.__name__} does not score the next item as forward(item_seq, item_seq_len) times "
                    f"the item table with a plain CE loss; supported: {', '.join(sorted(NEIGHBOUR_TERM_BACKBONES))}")
        return None

    def scores_with_neighbours(self, interaction) -> torch.Tensor:
        """Scores over every item: the backbone's product with the neighbour term added."""
        encoder = self.item_embedding
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        seq_output = self.forward(item_seq, item_seq_len)
        training = self.training
        return self.neighbour_term.add_to(seq_output @ encoder.weight.T, seq_output, item_seq, item_seq_len,
                                          encoder.masked_modalities, encoder.cold_rows if training else None,
                                          encoder.dropped_ids if training else None)

    def calculate_loss(self, interaction):
        with self.item_embedding.shared_table():
            if self.neighbour_term is not None:
                return self.loss_fct(self.scores_with_neighbours(interaction), interaction[self.POS_ITEM_ID])
            return super().calculate_loss(interaction)

    def predict(self, interaction):
        """The backbone's ``predict``; with ``score_with: id`` or the neighbour term, read off ``full_sort_predict``.

        Backbones look a candidate up with ``item_embedding(ids)``, the input sequence's call, so
        ID-only scores come from ``full_sort_predict`` (which scores through ``.weight``); the
        neighbour term is defined over every item.
        """
        encoder = self.item_embedding
        with encoder.shared_table():
            if (encoder.score_with == "id" and encoder.modalities) or self.neighbour_term is not None:
                scores = self.full_sort_predict(interaction)
                return scores.gather(1, interaction[self.ITEM_ID].long().unsqueeze(1)).squeeze(1)
            return super().predict(interaction)

    def full_sort_predict(self, interaction):
        with self.item_embedding.shared_table():
            if self.neighbour_term is not None:
                return self.scores_with_neighbours(interaction)
            return super().full_sort_predict(interaction)


def make_reveal_model(backbone: type, name: str | None = None, register: bool = True) -> type:
    """Build (and register with RecBole's lookups) ``<Backbone>REVEAL`` from a sequential backbone."""
    check_backbone(backbone)  # an unsupported backbone is refused here, before any data work
    name = name or f"{backbone.__name__}REVEAL"
    model_class = type(
        name,
        (REVEALRecommender, backbone),
        {
            "backbone": backbone,
            "__doc__": f"{backbone.__name__} with the REVEAL item encoder.",
            # the RecBole alias module that register_model creates, so checkpoints can pickle the class
            "__module__": f"recbole.model.sequential_recommender.{name.lower()}",
        },
    )
    return register_reveal_model(model_class) if register else model_class


def register_reveal_model(model_class: type) -> type:
    """Register a REVEAL model with its multimodal dataset class and trainer."""
    from reveal_recbole.data.dataset import MultimodalSequentialDataset
    from reveal_recbole.registry import register_model
    from reveal_recbole.trainer import REVEALTrainer

    return register_model(model_class, MultimodalSequentialDataset, REVEALTrainer)
