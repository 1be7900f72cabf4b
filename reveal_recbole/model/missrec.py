"""MISSRec: multimodal interest-aware sequence representation, fine-tuned from scratch on the target set.

Wang et al., "MISSRec: Pre-training and Transferring Multi-modal Interest-aware Sequence Representation
for Recommendation", ACM MM 2023; read from the authors' code (gimpong/MM23-MISSRec: ``missrec.py``,
``model_utils.py``, ``cluster_utils.py``, ``trainer.py``, ``props/MISSRec.yaml``, ``props/finetune.yaml``,
their ``script/run01.sh`` / ``run03.sh``: fine-tuning with no pre-training).

- Items: each modality's frozen feature row through its own linear adaptor; an item in the sequence is
  ``text + image (+ ID, transductive) + position`` (their ``seq_mm_fusion: add``), LayerNorm, dropout.
- Interests (:meth:`MISSRec.discover_interests`, before every training epoch): the adapted text and image
  rows of every item, pooled, are clustered by one k-means step into ``interest_ratio`` x their number
  clusters (theirs: random distinct points as centres, one assignment and mean update, then every point
  assigned to the nearest new centre). A sequence's interest tokens are the distinct clusters of its
  items' text and image rows (:meth:`MISSRec.interest_tokens`).
- Their ``nn.Transformer``, built as its encoder and decoder (post-LN, GELU, ``n_layers / 2`` encoder and
  as many decoder layers, at least one each): the encoder reads the interest tokens (the cluster centres,
  no position), the decoder the items, with no causal mask, cross-attending to the encoded interests; the
  sequence is the decoder's output at the last item, L2-normalised.
- Scores (:meth:`MISSRec.fused_logits`): cosines to each modality's adapted rows, mixed per user and item by
  ``softmax(f * [cos_text, cos_image])`` (``item_mm_fusion: dynamic_shared``: one learned ``f``, 0 at
  start); transductive: ``(cos_id + 2 * mixed) / 3``; over ``temperature`` (0.07). Loss: cross-entropy
  over all items plus ``gamma`` x the interests' orthogonality term (:meth:`MISSRec.interest_regularisation`).
- Initialisation as theirs: the Transformer's xavier reset, then N(0, ``initializer_range``) for Linear and
  Embedding weights; the adaptors keep PyTorch's default.

Where ours differs, and why:

- No pre-training stage; ``train_stage`` is ``transductive_ft`` or ``inductive_ft`` (their no-pretraining
  runs), ``pretrain`` is refused. Their runs use hidden size 300; ours 64, the compare tables' protocol.
- The orthogonality term pools each sequence's encoded interests over its interest tokens only; theirs sums
  the padded positions' outputs too, scaled by the share of real tokens, so it depends on the batch's
  longest interest list.
- The k-means reads its first centres from a generator seeded by the run's seed and the epoch (theirs: the
  numpy stream), so every DDP rank finds the same interests; an empty cluster keeps its centre.
- The points are assigned in blocks (``interest_block_mb`` of distances at a time): the assignment is ``points x
  interests x hidden`` work, ``items^2`` at ``interest_ratio`` 0.5 (theirs: one block, ``2 items x items``
  distances in memory). Lower ``interest_ratio`` on a large catalogue (BENCHMARKS.md "MISSRec").
- A sequence's interest tokens are deduplicated by one sort per batch, not a Python loop per sequence.
- Items with no feature row in a modality use a zero row, as every model here (theirs: the same zero rows).
"""
from __future__ import annotations

import math
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from reveal_recbole.data.dataset import MultimodalSequentialDataset, configured_modalities
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.item_encoder import AdaptedFeatureEncoder
from reveal_recbole.registry import register_model
from reveal_recbole.trainer import MISSRecTrainer

TRAIN_STAGES = ("transductive_ft", "inductive_ft")
ITEM_FUSIONS = ("static", "dynamic_shared", "dynamic_instance")


def kmeans_step(points: torch.Tensor, k: int, generator: torch.Generator,
                block_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Their interest clustering: ``k`` distinct points as centres, one assignment and mean update, then the
    final assignment to the new centres. Returns ``(centres (k, d), assignment (n,))``; an empty cluster
    keeps its centre. Distances are computed ``block_bytes`` of them at a time."""
    order = torch.randperm(len(points), generator=generator)[:k].to(points.device)
    centres = points[order].clone()
    assignment = nearest_centres(points, centres, block_bytes)
    sums = torch.zeros_like(centres).index_add_(0, assignment, points)
    counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
    centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres, nearest_centres(points, centres, block_bytes)


def nearest_centres(points: torch.Tensor, centres: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Index of each point's nearest centre (squared Euclidean distance), as many points at a time as
    ``block_bytes`` of float32 distances hold (at least one)."""
    block = max(1, block_bytes // (4 * len(centres)))
    centre_norms = (centres ** 2).sum(1)
    nearest = torch.empty(len(points), dtype=torch.long, device=points.device)
    for start in range(0, len(points), block):
        chunk = points[start:start + block]
        nearest[start:start + block] = (centre_norms - 2 * chunk @ centres.T).argmin(1)  # |x|^2 is the same per row
    return nearest


# Multiply-adds of one epoch's clustering above which the model says so when it is built: ~2 minutes
# on one CPU thread (BENCHMARKS.md "MISSRec's cost": 5e12 took 588 s at 100k items).
CLUSTERING_WARN_MACS = 1e12


def warn_if_clustering_is_large(points: int, interests: int, hidden: int, ratio: float) -> None:
    """Log what the per-epoch clustering costs when it is large: it grows with the square of the catalogue."""
    macs = 2 * points * interests * hidden  # two assignments of every point to every centre
    if macs > CLUSTERING_WARN_MACS:
        getLogger().warning(
            f"MISSRec clusters {points:,} item rows into {interests:,} interests before every epoch "
            f"(interest_ratio {ratio}): {macs:.1e} multiply-adds per epoch, growing with items^2 "
            f"(~10 CPU-minutes at 100k items); lower interest_ratio for a catalogue this large")


def softmax_mix(first: torch.Tensor, second: torch.Tensor, factor: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``softmax(f * [a, b]) . [a, b]`` as ``b + sigmoid(f (a - b)) (a - b)``; ``in_place`` (no gradients) reuses
    ``first`` and ``second``: one more buffer, not four."""
    if not in_place:
        gap = first - second
        return second + torch.sigmoid(factor * gap) * gap
    gap = first.sub_(second)
    del first
    weight = torch.mul(gap, factor).sigmoid_()
    return second.add_(weight.mul_(gap))


class MISSRecItemEncoder(AdaptedFeatureEncoder):
    """Each modality's rows through its own linear adaptor (and the ID table when transductive)."""

    def __init__(self, id_embedding: nn.Embedding | None, features: dict, hidden: int, feature_trainable: bool):
        super().__init__(id_embedding, features, {m: nn.Linear(rows.dim, hidden) for m, rows in features.items()},
                         feature_trainable)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """An item as the sequence reads it: the sum of its adapted modalities (and its ID row)."""
        return self.with_id(sum(self.adapted(m, ids) for m in self.modalities), ids)


class MISSRec(SequentialRecommender):
    """An interest encoder and an item decoder over adapted text and image rows (see the module docstring)."""

    # (users, items) matrices alive at once in full_sort_predict (ranking.size_eval_batch): the two modalities'
    # cosines and the mix's weight, the rest written in place (fused_logits; benchmarks/bench_eval_memory.py:
    # 3.00 per user at 100k items)
    eval_score_buffers = 3

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        stage = config["train_stage"]
        if stage not in TRAIN_STAGES:
            raise ConfigError(f"train_stage must be one of {TRAIN_STAGES}, got {stage!r}: MISSRec here is fine-tuned "
                              "from scratch on the target set (no pre-training stage)")
        if config["loss_type"] != "CE":
            raise ConfigError(f"MISSRec fine-tunes with cross-entropy over all items: loss_type must be CE, "
                              f"got {config['loss_type']!r}")
        fusion = config["item_mm_fusion"]
        if fusion not in ITEM_FUSIONS:
            raise ConfigError(f"item_mm_fusion must be one of {ITEM_FUSIONS}, got {fusion!r}")
        modalities = configured_modalities(config)
        if not modalities:
            raise ConfigError("MISSRec reads its items' features: modalities must name at least one")
        features = getattr(dataset, "item_features", None)
        if features is None:
            raise TypeError(f"MISSRec needs item features, but {type(dataset).__name__} has none: "
                            "build the dataset with reveal_recbole.data.create_dataset (MultimodalSequentialDataset)")
        self.train_stage, self.item_fusion = stage, fusion
        self.hidden_size = config["hidden_size"]
        self.temperature, self.gamma = config["temperature"], config["gamma"]
        self.initializer_range = config["initializer_range"]
        self.interest_block_bytes = int(config["interest_block_mb"] * 2**20)
        self.seed = config["seed"] or 0
        id_table = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0) if stage == "transductive_ft" else None
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        half = max(1, config["n_layers"] // 2)  # theirs: n_layers split between the encoder and the decoder
        layer = {"d_model": self.hidden_size, "nhead": config["n_heads"], "dim_feedforward": config["inner_size"],
                 "dropout": config["hidden_dropout_prob"], "activation": "gelu",
                 "layer_norm_eps": config["layer_norm_eps"], "batch_first": True}
        # their nn.Transformer, as its two halves (each with its final LayerNorm); no nested-tensor fast path,
        # a prototype that warns at every evaluation
        eps = config["layer_norm_eps"]
        self.interest_encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), half,
                                                      norm=nn.LayerNorm(self.hidden_size, eps=eps),
                                                      enable_nested_tensor=False)
        self.item_decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), half,
                                                  norm=nn.LayerNorm(self.hidden_size, eps=eps))
        for parameter in (*self.interest_encoder.parameters(), *self.item_decoder.parameters()):
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)  # nn.Transformer's own reset, before the init below
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=eps)
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.loss_fct = nn.CrossEntropyLoss()
        self.apply(self._init_weights)
        if id_table is not None:
            id_table.apply(self._init_weights)
        # the adaptors are built after the initialisation, as theirs (PyTorch's default Linear init)
        self.item_embedding = MISSRecItemEncoder(id_table, {m: features[m] for m in modalities},
                                                 self.hidden_size, config["feature_trainable"])
        if len(modalities) > 1 and fusion != "static":
            self.fusion_factor = nn.Parameter(torch.zeros(() if fusion == "dynamic_shared" else self.n_items))
        points = len(modalities) * (self.n_items - 1)
        self.num_interests = max(math.ceil(points * config["interest_ratio"]), 1)
        warn_if_clustering_is_large(points, self.num_interests, self.hidden_size, config["interest_ratio"])
        self.register_buffer("interest_embeddings", torch.zeros(self.num_interests + 1, self.hidden_size))
        self.register_buffer("interest_lookup", torch.zeros(len(modalities), self.n_items, dtype=torch.long))
        # AVL's running means (mean L_v, mean L_t, count), as REVEALRecommender keeps them
        self.register_buffer("avl_running_losses", torch.zeros(3, dtype=torch.float64))
        # the trainer finds the interests before every epoch and a checkpoint carries them; a model scored
        # with neither finds them at its first forward, not here (at 100k items that is 10 CPU-minutes)
        self.interests_found = False
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "interests_found", True))

    def _init_weights(self, module: nn.Module) -> None:
        """Theirs: N(0, initializer_range) Linear and Embedding weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    @torch.no_grad()
    def discover_interests(self, epoch: int) -> None:
        """Cluster every item's adapted rows (all modalities pooled, masks ignored) into the interest tokens:
        ``interest_embeddings[1:]`` the centres, ``interest_lookup[m, i]`` item ``i``'s cluster in modality
        ``m`` (1-based; 0 is padding). Called before every training epoch (:class:`MISSRecTrainer`); a masked
        modality (AVL, the diagnostics) is clustered all the same."""
        encoder = self.item_embedding
        points = torch.cat([encoder.adaptors[m](encoder.feature_tables[m][1:]) for m in encoder.modalities]).float()
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch + 1)
        centres, assignment = kmeans_step(points, self.num_interests, generator, self.interest_block_bytes)
        self.interest_embeddings[1:] = centres.to(self.interest_embeddings.dtype)
        self.interest_lookup[:, 1:] = (assignment + 1).view(len(encoder.modalities), -1)
        self.interests_found = True

    def interest_tokens(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``(B, T)``: each sequence's distinct interests over its items' modalities, 0-padded (their per-sequence
        ``unique``), as one sort: repeats are zeroed, then the zeros sorted to the end and trimmed."""
        interests = self.interest_lookup[:, item_seq].permute(1, 0, 2).reshape(len(item_seq), -1)
        interests = interests.sort(dim=1).values
        repeat = torch.zeros_like(interests, dtype=torch.bool)
        repeat[:, 1:] = interests[:, 1:] == interests[:, :-1]
        interests = interests.masked_fill(repeat, 0).sort(dim=1, descending=True).values
        width = max(1, int((interests > 0).sum(1).max()))
        return interests[:, :width]

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised sequence representation ``(B, H)`` and the encoded interests' orthogonality term."""
        if not self.interests_found:
            self.discover_interests(epoch=-1)
        interests = self.interest_tokens(item_seq)
        interest_padding = interests == 0
        memory = self.interest_encoder(self.interest_embeddings[interests], src_key_padding_mask=interest_padding)
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        items = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        output = self.item_decoder(items, memory, tgt_key_padding_mask=item_seq == 0,
                                          memory_key_padding_mask=interest_padding)
        sequence = F.normalize(self.gather_indexes(output, item_seq_len - 1), dim=-1)
        return sequence, self.interest_regularisation(memory, interest_padding)

    @staticmethod
    def interest_regularisation(memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Their diversity term: ``sum_b |mean of b's encoded interests|^2 / H`` (summed over the batch, as theirs)."""
        real = (~padding).unsqueeze(-1).to(memory.dtype)
        pooled = (memory * real).sum(1) / real.sum(1).clamp(min=1)
        return (pooled ** 2).sum() / memory.shape[-1]

    def fused_logits(self, sequence: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine scores over ``items`` (every item when None), the modalities mixed per user and item, over the
        temperature. ``(B, items)`` for a catalogue, ``(B,)`` for one item per row.

        Ranking the catalogue without gradients, each step writes into a buffer it no longer needs (the same
        formula): 3 ``(B, items)`` matrices at once instead of 7 (:attr:`eval_score_buffers`)."""
        in_place = items is None and not torch.is_grad_enabled()

        def cosines(rows: torch.Tensor) -> torch.Tensor:
            rows = F.normalize(rows, dim=-1)
            return sequence @ rows.T if items is None else (sequence * rows).sum(-1)

        encoder = self.item_embedding
        per_modality = [cosines(encoder.adapted(m, items)) for m in encoder.modalities]
        if len(per_modality) == 1:
            mixed = per_modality.pop()
        elif self.item_fusion == "static":
            first, second = per_modality.pop(0), per_modality.pop()
            mixed = first.add_(second).div_(2) if in_place else (first + second) / 2
        else:
            factor = self.fusion_factor if self.item_fusion == "dynamic_shared" or items is None \
                else self.fusion_factor[items]
            mixed = softmax_mix(per_modality.pop(0), per_modality.pop(), factor, in_place)
        if encoder.id_embedding is not None:
            ids = cosines(encoder.id_embedding.weight if items is None else encoder.id_embedding(items))
            mixed = mixed.mul_(2).add_(ids).div_(3) if in_place else (ids + 2 * mixed) / 3
        return mixed.div_(self.temperature) if in_place else mixed / self.temperature

    def calculate_loss(self, interaction):
        sequence, regularisation = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        logits = self.fused_logits(sequence)
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID]) + self.gamma * regularisation

    def predict(self, interaction):
        sequence, _ = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.fused_logits(sequence, interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction):
        sequence, _ = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.fused_logits(sequence)


register_model(MISSRec, MultimodalSequentialDataset, MISSRecTrainer)
