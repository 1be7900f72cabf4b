"""M3SRec: the REVEAL authors' multimodal sequential backbone, as a RecBole model.

REVEAL: Li et al., "Teach Multimodal Recommendation Model to See via Personalized Visual
Extraction and Adaptive Learning", arXiv 2606.09082, 2026; the backbone their experiments use,
read from their code (YutongLi2024/REVEAL: ``M3SRec/M3SRec.py``, ``M3SRec/trainers.py``
``STOSATrainer``, ``M3SRec/main.py``; the same model with AVL masking in ``REVEAL/AVL/M3SRec.py``).
Its sequence encoder is STOSA's (Fan et al., "Sequential Recommendation via Stochastic
Self-Attention", WWW 2022): every item is a Gaussian, a mean and a diagonal covariance, and
attention scores are negative 2-Wasserstein distances.

What follows their code:

- Two item representations, ``mean`` and ``cov``, each with its own ID table, image and text
  projections and fusion: ``e = e_id + e_v + e_t + moe(e_id, e_v, e_t)``, the authors' mixture of
  experts (:class:`~reveal_recbole.model.item_encoder.MixtureOfExperts`: 2 shared and 4 specific
  experts, gates ``hidden / 4`` wide), built by :class:`~reveal_recbole.model.item_encoder.REVEALItemEncoder`
  with ``fusion: moe`` over the dataset's loaded feature tables.
- Input: ``LayerNorm(e + position)``, dropout, then ``ELU`` (mean) and ``ELU(dropout(.)) + 1`` (cov;
  their cov branch drops out twice).
- Layers (their ``DistSAEncoder``): mean and cov queries, keys and values (``ELU + 1`` on the cov
  ones), attention ``softmax(-W2(q, k) / sqrt(d) + mask)``, mean context ``P v_mean``, cov context
  ``P^2 v_cov``, output projections with one shared LayerNorm, then a feed-forward of width 4H with
  ELU per branch (``ELU + 1`` after the cov one).
- Loss (``STOSATrainer.bpr_optimization``): ``-log sigmoid(d(s, neg) - d(s, pos))`` plus
  ``pvn_weight * max(d(s, pos) - d(pos, neg), 0)``, with ``d`` the squared 2-Wasserstein distance
  and an item's covariance ``ELU(cov row) + 1``; a candidate's score is ``-d(s, item)``.
- Initialisation: Linear and Embedding weights ``N(0.01, initializer_range)``, biases 0.

Where ours differs, and why:

- ``score_with: fused`` (default here) scores candidates with their fused rows; the authors score
  with the ID tables only (``dist_predict_full`` reads ``item_mean/cov_embeddings.weight``:
  ``score_with: id``). Fused scoring lets the compare table's cold items (``cold_item_share``) be
  ranked by their features, as every multimodal model here is.
- The mixture's attention weights each item's own outputs (see ``MixtureOfExperts``); theirs mixes
  sequence positions 0-3 and copies position 0's result to all 100 positions (and hard-codes 100).
- Layers are chained. STOSA's published ``DistSAEncoder`` assigns each layer's mean output to a
  misspelt name (``maen_hidden_states``), so its mean output is its input; the authors' ``modules.py``
  is not in their repository, so whether they inherit that typo cannot be checked.
- ``logsigmoid`` in place of ``log(sigmoid(x + 1e-24))`` (same value, no ``-inf`` for large gaps).
- RecBole's data: right-padded sequences (the last item is read at ``item_seq_len - 1``), one
  target and one uniform negative per training sequence (RecBole's prefix augmentation gives the
  (prefix, next item) pairs their per-position loss sums over); their unused ``user_margins`` is left out.
- Frozen feature tables by default (``feature_trainable``; they fine-tune), shared with the dataset.
- Distances between every sequence and every item (:func:`wasserstein_distance_matmul`) are one product of
  ``[mean, sqrt cov]`` rows with the row terms added into its buffer (the same value): ranking a
  catalogue holds one ``(users, items)`` matrix where their two products and sums held four.

Image and text masking (``item_embedding.masking``), per-modality parameters for AVL and the
diagnostics go through :class:`GaussianItemEncoders`, which masks both encoders at once: the
projected modality embedding is zero in both branches, where the authors' ``avl_apply_mask`` zeroes it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from reveal_recbole.data.dataset import MultimodalSequentialDataset, configured_modalities
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.item_encoder import SCORE_WITH, SETTING_DEFAULTS, REVEALItemEncoder
from reveal_recbole.model.reveal import REVEALRecommender
from reveal_recbole.registry import register_model
from reveal_recbole.trainer import REVEALTrainer

MASK_VALUE = -(2.0 ** 32) + 1  # the authors' attention mask value


def covariance(rows: torch.Tensor) -> torch.Tensor:
    """STOSA's positive covariance of an embedding row: ``ELU(x) + 1``."""
    return F.elu(rows) + 1


def wasserstein_distance(mean1, cov1, mean2, cov2) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians, row by row (last axis summed)."""
    sqrt1, sqrt2 = cov1.clamp(min=1e-24).sqrt(), cov2.clamp(min=1e-24).sqrt()
    return ((mean1 - mean2) ** 2).sum(-1) + ((sqrt1 - sqrt2) ** 2).sum(-1)


def wasserstein_distance_matmul(mean1, cov1, mean2, cov2) -> torch.Tensor:
    """The same distance between every row of ``(.., n, d)`` inputs 1 and every row of ``(.., m, d)`` inputs 2.

    ``|m1|^2 + sum c1 + |m2|^2 + sum c2 - 2 [m1, sqrt c1] . [m2, sqrt c2]``: one product, the row terms added
    into its buffer, so ranking a catalogue holds one ``(n, m)`` matrix (the authors' form, two products and
    their sums, held four)."""
    left = torch.cat([mean1, cov1.clamp(min=1e-24).sqrt()], -1)
    right = torch.cat([mean2, cov2.clamp(min=1e-24).sqrt()], -1)
    left_rows = (mean1 ** 2).sum(-1, keepdim=True) + cov1.sum(-1, keepdim=True)
    right_rows = ((mean2 ** 2).sum(-1, keepdim=True) + cov2.sum(-1, keepdim=True)).transpose(-1, -2)
    product = left @ right.transpose(-1, -2)
    # under autocast the product is half precision and the row terms float32: the sum is float32, as the
    # authors' out-of-place form gives (attention adds a -2^32 mask to it, which half precision cannot hold)
    product = product.to(torch.promote_types(product.dtype, torch.promote_types(left_rows.dtype, right_rows.dtype)))
    return product.mul_(-2).add_(left_rows).add_(right_rows)


class GaussianItemEncoders(nn.Module):
    """M3SRec's ``mean`` and ``cov`` item encoders, seen by AVL and the diagnostics as one ``item_embedding``."""

    def __init__(self, mean: REVEALItemEncoder, cov: REVEALItemEncoder):
        super().__init__()
        self.mean, self.cov = mean, cov

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.mean.modalities

    @property
    def score_with(self) -> str:
        return self.mean.score_with

    @contextlib.contextmanager
    def masking(self, modalities: Iterable[str]) -> Iterator[None]:
        """Remove ``modalities`` from both encoders inside the block."""
        modalities = list(modalities)
        with self.mean.masking(modalities), self.cov.masking(modalities):
            yield

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The modality's own parameters in both branches (their ``image``/``task2``/``dnn2`` names)."""
        return [*self.mean.modality_parameters(modality), *self.cov.modality_parameters(modality)]

    @contextlib.contextmanager
    def shared_table(self) -> Iterator[None]:
        with self.mean.shared_table(), self.cov.shared_table():
            yield

    def candidates(self, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of candidate items (all rows when ``ids`` is None), as they are scored."""
        rows = []
        for encoder in (self.mean, self.cov):
            if ids is None:
                rows.append(encoder.weight)  # the ID table with score_with: id, else the fused table
            elif encoder.score_with == "id":
                rows.append(encoder.id_embedding(ids))
            else:
                rows.append(encoder(ids))
        return rows[0], covariance(rows[1])


class WassersteinSelfAttention(nn.Module):
    """STOSA's ``DistSelfAttention``: attention from negative Wasserstein distances of Gaussian queries and keys."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, hidden_dropout: float):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden_size ({hidden}) must be a multiple of n_heads ({heads})")
        self.heads, self.head_size = heads, hidden // heads
        names = ("mean_query", "mean_key", "mean_value", "cov_query", "cov_key", "cov_value", "mean_dense", "cov_dense")
        for name in names:
            setattr(self, name, nn.Linear(hidden, hidden))
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out_dropout = nn.Dropout(hidden_dropout)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-12)  # one LayerNorm for both branches, as theirs

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.heads, self.head_size).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def forward(self, mean: torch.Tensor, cov: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_mean, k_mean, v_mean = (self.split(f(mean)) for f in (self.mean_query, self.mean_key, self.mean_value))
        q_cov, k_cov, v_cov = (self.split(covariance(f(cov))) for f in (self.cov_query, self.cov_key, self.cov_value))
        scores = -wasserstein_distance_matmul(q_mean, q_cov, k_mean, k_cov) / math.sqrt(self.head_size) + mask
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        mean_out = self.layer_norm(self.out_dropout(self.mean_dense(self.merge(probs @ v_mean))) + mean)
        cov_out = self.layer_norm(self.out_dropout(self.cov_dense(self.merge(probs ** 2 @ v_cov))) + cov)
        return mean_out, cov_out


class FeedForward(nn.Module):
    """STOSA's ``DistIntermediate``: Linear(H, 4H), ELU, Linear(4H, H), dropout, residual LayerNorm."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.ELU(), nn.Linear(4 * hidden, hidden),
                                 nn.Dropout(dropout))
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.net(x) + x)


class WassersteinLayer(nn.Module):
    """STOSA's ``DistLayer``: attention, then one feed-forward per branch (``ELU + 1`` after the cov one)."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, hidden_dropout: float):
        super().__init__()
        self.attention = WassersteinSelfAttention(hidden, heads, attn_dropout, hidden_dropout)
        self.mean_feed_forward = FeedForward(hidden, hidden_dropout)
        self.cov_feed_forward = FeedForward(hidden, hidden_dropout)

    def forward(self, mean, cov, mask):
        mean, cov = self.attention(mean, cov, mask)
        return self.mean_feed_forward(mean), covariance(self.cov_feed_forward(cov))


class M3SRec(SequentialRecommender):
    """STOSA over items fused from ID, image and text by the REVEAL authors' mixture of experts."""

    # (users, items) matrices alive at once in full_sort_predict (ranking.size_eval_batch): the one distance
    # product, the row terms added in place (benchmarks/bench_eval_memory.py: 1.00 per user at 100k items)
    eval_score_buffers = 1

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if config["loss_type"] != "BPR":
            raise ConfigError("M3SRec trains with its Wasserstein BPR loss: loss_type must be BPR, "
                              f"got {config['loss_type']!r}")
        self.hidden_size = config["hidden_size"]
        self.pvn_weight = config["pvn_weight"]
        self.initializer_range = config["initializer_range"]
        self.init_mean = config["init_mean"]
        modalities = configured_modalities(config)
        if modalities and getattr(dataset, "item_features", None) is None:
            raise TypeError(f"M3SRec needs item features, but {type(dataset).__name__} has none: "
                            "build the dataset with reveal_recbole.data.create_dataset (MultimodalSequentialDataset)")
        id_tables = [nn.Embedding(self.n_items, self.hidden_size, padding_idx=0) for _ in range(2)]
        cold = REVEALRecommender.cold_item_settings(self, config, dataset, id_tables[0], modalities)
        self.item_embedding = GaussianItemEncoders(*(self.build_encoder(config, dataset, modalities, table, cold)
                                                     for table in id_tables))
        self.position_mean = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.position_cov = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.layer_norm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        dropouts = config["attn_dropout_prob"], config["hidden_dropout_prob"]
        self.layers = nn.ModuleList(
            WassersteinLayer(self.hidden_size, config["n_heads"], *dropouts) for _ in range(config["n_layers"])
        )
        self.apply(self._init_weights)
        # AVL's running means (mean L_v, mean L_t, count), as REVEALRecommender keeps them
        self.register_buffer("avl_running_losses", torch.zeros(3, dtype=torch.float64))

    @staticmethod
    def build_encoder(config, dataset, modalities, id_embedding: nn.Embedding, cold: dict) -> REVEALItemEncoder:
        """One branch's item encoder: its own ID table, projections and mixture over the dataset's feature rows
        (``cold``: :meth:`REVEALRecommender.cold_item_settings`, the same for both branches)."""
        settings = {key: default if config[key] is None else config[key] for key, default in SETTING_DEFAULTS.items()}
        if settings["score_with"] not in SCORE_WITH:
            raise ConfigError(f"score_with must be one of {SCORE_WITH}, got {settings['score_with']!r}")
        return REVEALItemEncoder(
            id_embedding,
            {m: dataset.item_features[m] for m in modalities},
            fusion="moe",
            feature_trainable=config["feature_trainable"],
            feature_dropout=config["feature_dropout"],
            missing_feature=config["missing_feature"],
            feature_norm=config["feature_norm"],
            **cold,
            **settings,
        )

    def _init_weights(self, module: nn.Module) -> None:
        """The authors' ``init_weights``: N(0.01, initializer_range) weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=self.init_mean, std=self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def attention_mask(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L, L)``: 0 where a position may attend (itself or an earlier non-padding item), else MASK_VALUE."""
        length = item_seq.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=item_seq.device).tril()
        allowed = (item_seq > 0)[:, None, None, :] & causal
        return torch.zeros(allowed.shape, device=item_seq.device).masked_fill(~allowed, MASK_VALUE)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The user's Gaussian (mean, covariance) at the last item of each sequence, ``(B, H)`` each."""
        positions = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        encoders = self.item_embedding
        mean = self.dropout(self.layer_norm(encoders.mean(item_seq) + self.position_mean(positions)))
        cov = self.dropout(self.layer_norm(encoders.cov(item_seq) + self.position_cov(positions)))
        mean, cov = F.elu(mean), covariance(self.dropout(cov))
        mask = self.attention_mask(item_seq)
        for layer in self.layers:
            mean, cov = layer(mean, cov, mask)
        return self.gather_indexes(mean, item_seq_len - 1), self.gather_indexes(cov, item_seq_len - 1)

    def calculate_loss(self, interaction):
        with self.item_embedding.shared_table():
            mean, cov = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            pos_mean, pos_cov = self.item_embedding.candidates(interaction[self.POS_ITEM_ID])
            neg_mean, neg_cov = self.item_embedding.candidates(interaction[self.NEG_ITEM_ID])
        pos = wasserstein_distance(mean, cov, pos_mean, pos_cov)
        neg = wasserstein_distance(mean, cov, neg_mean, neg_cov)
        pos_vs_neg = wasserstein_distance(pos_mean, pos_cov, neg_mean, neg_cov)
        loss = -F.logsigmoid(neg - pos).mean()
        return loss + self.pvn_weight * (pos - pos_vs_neg).clamp(min=0).mean()

    def predict(self, interaction):
        with self.item_embedding.shared_table():
            mean, cov = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            item_mean, item_cov = self.item_embedding.candidates(interaction[self.ITEM_ID])
        return -wasserstein_distance(mean, cov, item_mean, item_cov)

    def full_sort_predict(self, interaction):
        with self.item_embedding.shared_table():
            mean, cov = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
            item_mean, item_cov = self.item_embedding.candidates()
        return wasserstein_distance_matmul(mean, cov, item_mean, item_cov).neg_()


register_model(M3SRec, MultimodalSequentialDataset, REVEALTrainer)
