"""Test metrics per kind of target: cold (no training interaction) and warm head / torso / tail.

Buckets are fixed once, from the training split (:func:`~reveal_recbole.data.cold_start.training_item_counts`)
and the test targets: a target is **cold** when its item has no training interaction; the warm
targets are cut into **tail**, **torso** and **head** at the 1/3 and 2/3 quantiles of their
items' training counts (tail: count <= the 1/3 quantile; head: count > the 2/3 quantile; ties
keep an item in one bucket, so the three are near, not exactly, thirds: their counts are
reported). ``warm`` is head + torso + tail, ``all`` every target.

Ranks come from :func:`reveal_recbole.ranking.target_ranks` on the model's device after RecBole's
masking (``fve.feedback.mask_history``; ties to the lower id), one rank per target to the host,
so the ``all`` bucket reproduces RecBole's test Recall@K and NDCG@K (one target per user).
"""
from __future__ import annotations

from logging import getLogger

import numpy as np
import torch

from reveal_recbole.data.cold_start import training_item_counts
from reveal_recbole.fve.feedback import mask_history
from reveal_recbole.ranking import target_ranks

BUCKETS = ("all", "warm", "cold", "head", "torso", "tail")


def target_buckets(counts: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """One boolean mask over ``targets`` per bucket, from the items' training ``counts``."""
    target_counts = np.asarray(counts)[np.asarray(targets)]
    cold = target_counts == 0
    warm = ~cold
    low, high = np.quantile(target_counts[warm], [1 / 3, 2 / 3]) if warm.any() else (0, 0)
    return {
        "all": np.ones_like(cold),
        "warm": warm,
        "cold": cold,
        "head": warm & (target_counts > high),
        "torso": warm & (target_counts > low) & (target_counts <= high),
        "tail": warm & (target_counts <= low),
    }


def bucket_metrics(ranks: np.ndarray, buckets: dict[str, np.ndarray], topk=(10, 20)) -> dict[str, dict]:
    """Per bucket: ``n`` (targets) and Recall@K, NDCG@K (one target per row, 1-based ``ranks``); None when n = 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    result = {}
    for name, mask in buckets.items():
        bucket_ranks = ranks[mask]
        metrics: dict = {"n": int(mask.sum())}
        for k in topk:
            hit = bucket_ranks <= k
            metrics[f"recall@{k}"] = float(hit.mean()) if len(bucket_ranks) else None
            gains = np.where(hit, 1 / np.log2(bucket_ranks + 1), 0.0)
            metrics[f"ndcg@{k}"] = float(gains.mean()) if len(bucket_ranks) else None
        result[name] = metrics
    return result


@torch.no_grad()
def rank_targets(model: torch.nn.Module, eval_data) -> tuple[np.ndarray, np.ndarray]:
    """``(target items, their 1-based ranks)`` over a full-sort evaluation loader, as RecBole ranks them."""
    device = next(model.parameters()).device
    n_items = eval_data._dataset.item_num
    items, ranks = [], []
    was_training = model.training
    model.eval()
    try:
        for interaction, history_index, positive_u, positive_i in eval_data:
            scores = model.full_sort_predict(interaction.to(device)).view(-1, n_items)
            ranks.append(target_ranks(mask_history(scores, history_index), positive_u, positive_i).cpu().numpy())
            items.append(positive_i.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(items), np.concatenate(ranks)


def ranks_all_items(config) -> bool:
    """The test split is evaluated by full ranking (``eval_args: mode: full``), which the buckets need."""
    mode = (config["eval_args"] or {}).get("mode")
    return (mode.get("test") if isinstance(mode, dict) else mode) == "full"


def has_item_features(model) -> bool:
    """The model can score an item from its features (a REVEAL encoder with modalities, not ``score_with: id``)."""
    encoder = getattr(model, "item_embedding", None)
    return bool(getattr(encoder, "modalities", ())) and getattr(encoder, "score_with", "fused") != "id"


def evaluate_buckets(model, train_data, eval_data, topk=(10, 20), cold_item_share: float = 0.0) -> dict[str, dict]:
    """Per-bucket metrics of ``model`` on ``eval_data`` (RecBole's full-sort loader), buckets from ``train_data``.

    With ``cold_item_share`` > 0 and a model that cannot see item features, a warning says
    that its cold-target metrics are near 0 by construction, rather than leave a silent 0.
    """
    counts = training_item_counts(train_data._dataset)
    targets, ranks = rank_targets(model, eval_data)
    buckets = target_buckets(counts, targets)
    result = bucket_metrics(ranks, buckets, topk)
    if cold_item_share and result["cold"]["n"] and not has_item_features(model):
        getLogger().warning(
            f"{type(model).__name__} scores items without features: its {result['cold']['n']} cold test targets "
            "(items with no training interaction) can only be ranked from untrained or pushed-down ID rows, so its "
            "cold-target metrics are about 0 by construction; a *REVEAL model with image/text features can rank them"
        )
    return result


def format_buckets(result: dict[str, dict], metrics=("ndcg@10", "recall@20")) -> str:
    """One log line: ``cold (n=183): ndcg@10 0.0123 recall@20 0.0456 | ...``."""
    def cell(values: dict) -> str:
        return " ".join(f"{m} {values[m]:.4f}" if values[m] is not None else f"{m} -" for m in metrics)

    return " | ".join(f"{name} (n={values['n']}): {cell(values)}" for name, values in result.items())
