"""UniSRec: universal item representations from text, fine-tuned from scratch on the target set.

Hou et al., "Towards Universal Sequence Representation Learning for Recommender Systems", KDD 2022;
read from the authors' code (RUCAIBox/UniSRec: ``unisrec.py``, ``props/UniSRec.yaml``,
``props/finetune.yaml``, ``finetune.py``, ``data/dataset.py``).

An item's text embedding ``x`` (frozen, the dataset's ``text`` feature rows) passes the
MoE-enhanced adaptor: ``n_exps`` parametric-whitening experts ``PW_k(x) = W_k (drop(x) - b_k)``
mixed by a softmax gate ``x W_g`` (with noise ``N(0, 1) * (softplus(x W_n) + 0.01)`` in training).
A SASRec transformer (RecBole's, as theirs) reads ``adaptor(x_i) + position`` per item; the
sequence and every item are L2-normalised and the loss is cross-entropy over all items of their
cosine / ``temperature`` (0.07). ``train_stage`` as theirs:

- ``transductive_ft`` (default): an item is ``adaptor(x_i) + E_id[i]``, as input and as candidate;
- ``inductive_ft``: text only, no ID table: any item with a text row is scored, seen in training or not.

Where ours differs, and why:

- No pre-training stage (their ``pretrain`` on other Amazon domains): fine-tuned from scratch on the
  target set, the setting their paper also reports; the adaptor and transformer start from
  RecBole's initialisation. ``train_stage: pretrain`` is refused.
- Text rows come from the dataset's feature files (``modalities: [text]``; any one modality works),
  normalised at load by ``feature_norm`` like every model's here; theirs are raw BERT [CLS] vectors
  (``feature_norm: none``), which the whitening's learned bias then centres.
- Scores are cosines for full ranking (theirs) and for ``predict`` too.
- The loss and full ranking adapt every item once and read the input sequence's rows from that
  table; theirs adapts the ``B x L`` sequence rows separately. Same model; in training an item's
  input and candidate rows then share one draw of the adaptor's dropout and gate noise (theirs: one
  draw per occurrence). At most ``n_items`` rows a step, which the cross-entropy over all items
  needs anyway.

``item_embedding`` is :class:`UniSRecItemEncoder`, which masks its modality the way the REVEAL
encoder does (a masked text embedding is zero: transductive items fall back to their IDs), so
the diagnostics report UniSRec's text utilisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender import SASRec
from torch import nn

from reveal_recbole.data.dataset import MultimodalSequentialDataset, configured_modalities
from reveal_recbole.data.features import ItemFeatures
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.item_encoder import AdaptedFeatureEncoder
from reveal_recbole.registry import register_model
from reveal_recbole.trainer import REVEALTrainer

TRAIN_STAGES = ("transductive_ft", "inductive_ft")


class ParametricWhitening(nn.Module):
    """Their ``PWLayer``: ``W (drop(x) - b)``, a learned centring then a bias-free projection."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(in_dim))
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """Their ``MoEAdaptorLayer``: parametric-whitening experts mixed by a (noisy in training) softmax gate."""

    def __init__(self, in_dim: int, out_dim: int, experts: int, dropout: float, noisy_gating: bool = True):
        super().__init__()
        self.experts = nn.ModuleList(ParametricWhitening(in_dim, out_dim, dropout) for _ in range(experts))
        self.gate = nn.Parameter(torch.zeros(in_dim, experts))
        self.noise = nn.Parameter(torch.zeros(in_dim, experts))
        self.noisy_gating = noisy_gating

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.gate
        if self.noisy_gating and self.training:
            logits = logits + torch.randn_like(logits) * (F.softplus(x @ self.noise) + 1e-2)
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)
        return sum(gates[..., k:k + 1] * expert(x) for k, expert in enumerate(self.experts))


class UniSRecItemEncoder(AdaptedFeatureEncoder):
    """``adaptor(x_i)`` (+ ``E_id[i]`` when transductive) for the input sequence and for every candidate."""

    def __init__(self, id_embedding: nn.Embedding | None, modality: str, features: ItemFeatures, hidden: int,
                 experts: int, dropout: float, feature_trainable: bool):
        super().__init__(id_embedding, {modality: features},
                         {modality: MoEAdaptor(features.dim, hidden, experts, dropout)}, feature_trainable)

    def rows(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The item embeddings of ``ids`` (any shape), or of every item when ``ids`` is None."""
        return self.with_id(self.adapted(self.modalities[0], ids), ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows()


class UniSRec(SASRec):
    """SASRec over items represented by their MoE-adapted text (plus an ID embedding when transductive)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if self.loss_type != "CE":
            raise ConfigError(f"UniSRec fine-tunes with cross-entropy over all items: loss_type must be CE, "
                              f"got {self.loss_type!r}")
        stage = config["train_stage"]
        if stage not in TRAIN_STAGES:
            raise ConfigError(f"train_stage must be one of {TRAIN_STAGES}, got {stage!r}: UniSRec here is fine-tuned "
                              "from scratch on the target set (no pre-training stage)")
        modalities = configured_modalities(config)
        if len(modalities) != 1:
            raise ConfigError(f"UniSRec reads one modality (its paper: text), got modalities: {modalities}")
        features = getattr(dataset, "item_features", None)
        if features is None:
            raise TypeError(f"UniSRec needs item features, but {type(dataset).__name__} has none: "
                            "build the dataset with reveal_recbole.data.create_dataset (MultimodalSequentialDataset)")
        self.train_stage = stage
        self.temperature = config["temperature"]
        self.item_embedding = UniSRecItemEncoder(
            self.item_embedding if stage == "transductive_ft" else None,  # inductive: no ID table at all
            modalities[0], features[modalities[0]], self.hidden_size, config["n_exps"],
            config["adaptor_dropout_prob"], config["feature_trainable"],
        )

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, table: torch.Tensor | None = None):
        """The sequence's representation at its last item, ``(B, H)`` (SASRec's, over the adapted items).

        ``table``: every item's embedding, already computed for the candidates; the sequence's rows are
        read from it instead of adapting ``B x L`` rows again (5x faster on Scientific, where ``B x L`` is
        12,800 rows and the catalogue 1,585).
        """
        positions = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        items = self.item_embedding(item_seq) if table is None else F.embedding(item_seq, table)
        input_emb = self.dropout(self.LayerNorm(items + self.position_embedding(positions)))
        output = self.trm_encoder(input_emb, self.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]
        return self.gather_indexes(output, item_seq_len - 1)

    def sequence_and_items(self, interaction, items: torch.Tensor | None = None):
        """The normalised sequence representation and candidate rows (every item when ``items`` is None)."""
        table = self.item_embedding.weight if items is None else None
        sequence = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)
        candidates = table if items is None else self.item_embedding(items)
        return F.normalize(sequence, dim=-1), F.normalize(candidates, dim=-1)

    def calculate_loss(self, interaction):
        sequence, items = self.sequence_and_items(interaction)
        return self.loss_fct(sequence @ items.T / self.temperature, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        sequence, items = self.sequence_and_items(interaction, interaction[self.ITEM_ID])
        return (sequence * items).sum(-1)

    def full_sort_predict(self, interaction):
        sequence, items = self.sequence_and_items(interaction)
        return sequence @ items.T


register_model(UniSRec, MultimodalSequentialDataset, REVEALTrainer)
