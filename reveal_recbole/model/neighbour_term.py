"""A learned feature-neighbour score: what FeatureKNN knows, inside the trained model.

A backbone scores ``h_u . e_i`` in its hidden size (64): a rank-64 view of the features. Nearest
neighbours in the full feature space (same series, same product line) are what the training-free
FeatureKNN finds and the trained models miss on tail and new items (BENCHMARKS.md issue 15). This
term adds them to the backbone's score, with weights the model learns end to end:

    s(u, i) = h_u . e_i  +  user_weight(h_u) * item_weight(n_i) * sum_j recency_j cos(f[q_j], f[i])

``q_j`` the user's last items, ``n_i`` item ``i``'s training interactions: the model learns how
much a user's next item resembles their last ones (``user_weight``, from the sequence state) and
how much that holds for items the IDs know little about (``item_weight``, a logistic function of
``log(1 + n_i)``). Query items score 0 (as ``knn_exclude_query``). Masked modalities (AVL, the
utilisation diagnostics) are left out here too; several modalities average their cosines.

The sum is exact and costs one product per modality: ``sum_j recency_j cos(f[q_j], f[i])`` is
``query_u . f[i]`` with ``query_u = sum_j recency_j f[q_j]`` (unit rows), i.e. ``batch x width x
items`` per step, the shape of the logits. ``width`` is the feature width, or the rows' leading
principal components (``feature_neighbours_width``) where the full width costs too much per step
(BENCHMARKS.md "Scale"). Truncating to each item's 100 nearest items instead scored lower on
Scientific (.0914 vs .0988 NDCG@10) and cost ``items^2 x dim`` at build time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reveal_recbole.data.features import ItemFeatures, reduce_features


def neighbour_rows(features: ItemFeatures, width: int | None = None) -> torch.Tensor:
    """Unit feature rows for the cosines: the loaded rows (shared when already unit), or their ``width``
    leading principal components, normalised again; rows without a feature stay zero."""
    rows = features.values if features.unit_norm else F.normalize(features.values.float(), dim=1)
    if width is not None and width < rows.shape[1]:
        rows = F.normalize(reduce_features(rows, features.present, width), dim=1)
    return rows


class FeatureNeighbourTerm(nn.Module):
    """``user_weight(h) * item_weight(n) * knn(u, i)`` for every item (see the module docstring)."""

    eval_block_bytes = 64 * 2**20  # similarities held at once when adding the term without gradients

    def __init__(self, unit_rows: dict[str, torch.Tensor], training_counts: torch.Tensor, hidden_size: int,
                 last_items: int = 3):
        super().__init__()
        self.modalities = tuple(unit_rows)
        for modality, rows in unit_rows.items():  # derived from the frozen rows: rebuilt, not saved
            self.register_buffer(f"rows_{modality}", rows, persistent=False)
        log_counts = torch.log1p(training_counts.clamp(min=0).to(torch.float32))
        self.register_buffer("log_counts", log_counts, persistent=False)
        self.user_weight = nn.Linear(hidden_size, 1)
        self.item_weight = nn.Parameter(torch.zeros(2))  # logit = a + b log(1 + n): starts at 1/2 for every item
        self.recency_logits = nn.Parameter(-torch.arange(last_items, dtype=torch.float32))  # the last item first

    def query_items(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``last_items`` items (the last first; 0 before the sequence start) and their weights."""
        steps = len(self.recency_logits)
        positions = item_seq_len.unsqueeze(1) - 1 - torch.arange(steps, device=item_seq.device)
        present = positions >= 0
        items = torch.where(present, item_seq.gather(1, positions.clamp(min=0)), 0)
        logits = self.recency_logits.masked_fill(~present, float("-inf"))
        return items, torch.softmax(logits, dim=1)

    def queries(self, item_seq, item_seq_len, modalities: list[str],
                query_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query items ``(batch, last_items)`` and, per modality, ``(batch, width)``: their recency-weighted
        sum, over the modalities' count and times ``query_scale`` ``(batch, 1)``, so that ``query . row_i``
        is the term's similarity (no pass over ``(batch, items)`` for the weights)."""
        items, weights = self.query_items(item_seq, item_seq_len)
        scale = weights / len(modalities) if query_scale is None else weights * (query_scale / len(modalities))
        queries = {}
        for modality in modalities:
            rows = getattr(self, f"rows_{modality}")
            queries[modality] = (scale.unsqueeze(2).to(rows.dtype) * rows[items]).sum(1)
        return items, queries

    def similarity_block(self, queries: dict[str, torch.Tensor], items: slice = slice(None)) -> torch.Tensor:
        """``(batch, len(items))``: the queries' products with the ``items`` columns, one per modality,
        accumulated into one buffer."""
        total = None
        for modality, query in queries.items():
            rows = getattr(self, f"rows_{modality}")[items]
            total = query @ rows.T if total is None else total.addmm_(query.to(total.dtype), rows.T.to(total.dtype))
        return total

    def similarities(self, item_seq, item_seq_len, masked: frozenset[str] = frozenset(),
                     query_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """``(batch, items)``: recency-weighted mean cosine to the query items over the unmasked modalities,
        times ``query_scale`` ``(batch, 1)``; the query items themselves 0."""
        modalities = [m for m in self.modalities if m not in masked]
        if not modalities:
            return None
        items, queries = self.queries(item_seq, item_seq_len, modalities, query_scale)
        return self.similarity_block(queries).scatter_(1, items, 0.0)  # never the query items themselves

    def item_weights(self, unknown: torch.Tensor | None = None) -> torch.Tensor:
        """``sigmoid(a + b log(1 + n_i))``; ``unknown`` rows count as never trained on (``n = 0``)."""
        log_counts = self.log_counts if unknown is None else self.log_counts.masked_fill(unknown, 0.0)
        return torch.sigmoid(self.item_weight[0] + self.item_weight[1] * log_counts)

    def add_to(self, scores: torch.Tensor, seq_output, item_seq, item_seq_len, masked: frozenset[str] = frozenset(),
               absent: torch.Tensor | None = None, unknown: torch.Tensor | None = None) -> torch.Tensor:
        """``scores`` ``(batch, items)`` plus the term, in place; unchanged when every modality is masked.

        The user weight rides in the queries and the item weight in one fused multiply-add, so the term
        costs its products and one pass over ``(batch, items)`` (at 100k items, three passes fewer).
        ``absent`` rows (cold items in training, not yet in the catalogue) get 0, as their table rows;
        ``unknown`` rows (their ID dropped this step, ``id_dropout``) are weighed as new items, so the
        weight of a new item is learned from training positives (DropoutNet's idea) rather than
        extrapolated from the counts of warm ones. Without gradients (evaluation) the term is added
        :meth:`in_item_blocks`, so a score batch needs no second ``(batch, items)`` buffer.
        """
        modalities = [m for m in self.modalities if m not in masked]
        if not modalities:
            return scores
        user = F.softplus(self.user_weight(seq_output))  # (batch, 1)
        item_weights = self.item_weights(unknown)
        if absent is not None:
            item_weights = item_weights.masked_fill(absent, 0.0)
        query_items, queries = self.queries(item_seq, item_seq_len, modalities, query_scale=user)
        if not torch.is_grad_enabled():
            return self.in_item_blocks(scores, queries, query_items, item_weights.to(scores.dtype))
        knn = self.similarity_block(queries).scatter_(1, query_items, 0.0)
        return scores.addcmul_(knn.to(scores.dtype), item_weights.to(scores.dtype))

    def in_item_blocks(self, scores: torch.Tensor, queries: dict[str, torch.Tensor], query_items: torch.Tensor,
                       item_weights: torch.Tensor) -> torch.Tensor:
        """Add the term to ``scores`` a block of items at a time (``eval_block_bytes`` of similarities at
        once), and give the query items back their scores without it: exactly the one-buffer sum, at
        evaluation's memory budget (``ranking.size_eval_batch`` sizes one score matrix per batch)."""
        kept = scores.gather(1, query_items)
        block = max(1, self.eval_block_bytes // (scores.element_size() * max(1, len(scores))))
        for start in range(0, scores.shape[1], block):
            items = slice(start, start + block)
            scores[:, items].addcmul_(self.similarity_block(queries, items).to(scores.dtype), item_weights[items])
        return scores.scatter_(1, query_items, kept)

    def forward(self, seq_output, item_seq, item_seq_len, masked: frozenset[str] = frozenset(),
                absent: torch.Tensor | None = None, unknown: torch.Tensor | None = None) -> torch.Tensor:
        """The term alone, ``(batch, items)`` (:meth:`add_to` on zeros)."""
        zeros = seq_output.new_zeros(seq_output.shape[0], len(self.log_counts))
        return self.add_to(zeros, seq_output, item_seq, item_seq_len, masked, absent, unknown)
