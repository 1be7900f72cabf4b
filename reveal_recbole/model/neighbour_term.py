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

Only each item's ``k`` nearest items per modality carry a cosine (the others 0): the lists are
found once, at build time, from the frozen unit rows (:func:`nearest_neighbours`), so a training
step costs ``batch x last_items x k`` lookups plus one scatter into the ``(batch, items)`` scores,
not a ``(batch, dim) x (dim, items)`` product per modality (4x the whole feature projection's
cost at 100k items and 896-d). With ``k >= items - 1`` the term is exact.
"""
from __future__ import annotations

from logging import getLogger

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

NEIGHBOUR_CHUNK_ROWS = 4096


def nearest_neighbours(rows: torch.Tensor, k: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, cosines)``, each ``(items, k)``: every unit row's ``k`` most similar other rows, best first.

    A chunk of rows at a time against all of them (``items^2 x dim`` once; on the rows' device).
    A row never lists itself; rows without a feature (zero) have cosine 0 to everything.
    """
    n = rows.shape[0]
    k = max(min(k, n - 1), 1)
    indices = torch.empty(n, k, dtype=torch.long, device=rows.device)
    cosines = torch.empty(n, k, dtype=rows.dtype, device=rows.device)
    starts = range(0, n, NEIGHBOUR_CHUNK_ROWS)
    for start in tqdm(starts, desc="feature neighbours", unit="chunk", disable=not progress, leave=False):
        chunk = rows[start:start + NEIGHBOUR_CHUNK_ROWS]
        similarity = chunk @ rows.T
        own = torch.arange(len(chunk), device=rows.device)
        similarity[own, start + own] = float("-inf")
        cosines[start:start + len(chunk)], indices[start:start + len(chunk)] = similarity.topk(k, dim=1)
    return indices, cosines


class FeatureNeighbourTerm(nn.Module):
    """``user_weight(h) * item_weight(n) * knn(u, i)`` for every item (see the module docstring)."""

    def __init__(self, unit_rows: dict[str, torch.Tensor], training_counts: torch.Tensor, hidden_size: int,
                 last_items: int = 3, k: int = 100):
        super().__init__()
        self.modalities = tuple(unit_rows)
        self.n_items = len(training_counts)
        for modality, rows in unit_rows.items():  # derived from the frozen rows: rebuilt, not saved
            progress = rows.shape[0] > 10 * NEIGHBOUR_CHUNK_ROWS
            if progress:
                getLogger().info(f"feature_neighbours: the {k} nearest items of each of {rows.shape[0]} items "
                                 f"({modality}, {rows.shape[1]}-d)")
            indices, cosines = nearest_neighbours(rows.float(), k, progress)
            self.register_buffer(f"neighbours_{modality}", indices, persistent=False)
            self.register_buffer(f"cosines_{modality}", cosines, persistent=False)
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

    def similarities(self, item_seq, item_seq_len, masked: frozenset[str] = frozenset()) -> torch.Tensor | None:
        """``(batch, items)``: recency-weighted mean cosine to the query items over the unmasked modalities."""
        modalities = [m for m in self.modalities if m not in masked]
        if not modalities:
            return None
        items, weights = self.query_items(item_seq, item_seq_len)
        batch = items.shape[0]
        columns, values = [], []
        for modality in modalities:
            columns.append(getattr(self, f"neighbours_{modality}")[items].view(batch, -1))  # (batch, last x k)
            cosines = getattr(self, f"cosines_{modality}")[items]
            values.append((weights.unsqueeze(2) * cosines).view(batch, -1) / len(modalities))
        total = torch.zeros(batch, self.n_items, dtype=values[0].dtype, device=items.device)
        total = total.scatter_add(1, torch.cat(columns, 1), torch.cat(values, 1))
        return total.scatter(1, items, 0.0)  # never the query items themselves

    def item_weights(self, unknown: torch.Tensor | None = None) -> torch.Tensor:
        """``sigmoid(a + b log(1 + n_i))``; ``unknown`` rows count as never trained on (``n = 0``)."""
        log_counts = self.log_counts if unknown is None else self.log_counts.masked_fill(unknown, 0.0)
        return torch.sigmoid(self.item_weight[0] + self.item_weight[1] * log_counts)

    def forward(self, seq_output, item_seq, item_seq_len, masked: frozenset[str] = frozenset(),
                absent: torch.Tensor | None = None, unknown: torch.Tensor | None = None) -> torch.Tensor | None:
        """The term for every item, ``(batch, items)``; ``None`` when every modality is masked.

        ``absent`` rows (cold items in training, not yet in the catalogue) get 0, as their table rows;
        ``unknown`` rows (their ID dropped this step, ``id_dropout``) are weighed as new items, so the
        weight of a new item is learned from training positives (DropoutNet's idea) rather than
        extrapolated from the counts of warm ones.
        """
        knn = self.similarities(item_seq, item_seq_len, masked)
        if knn is None:
            return None
        user = F.softplus(self.user_weight(seq_output))  # (batch, 1)
        items = self.item_weights(unknown)
        if absent is not None:
            items = items.masked_fill(absent, 0.0)
        return user * knn * items
