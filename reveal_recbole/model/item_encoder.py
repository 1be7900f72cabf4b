"""The REVEAL item encoder: one module that stands in for a backbone's ``item_embedding``.

Sequential backbones in RecBole embed items in two ways: ``item_embedding(ids)`` for the input
sequence (and BPR's positive/negative items) and ``item_embedding.weight`` for full-ranking
(and CE) scores. The encoder answers both with the same fused representation

    e_i = fuse(E_id[i], drop(W_v f_v[i] + b_v), drop(W_t f_t[i] + b_t))

so a backbone runs unchanged; with ``score_with="id"`` the ``.weight`` side is the ID table
alone, as in the REVEAL authors' code. The ID table is the backbone's own ``nn.Embedding`` (its
initialisation is kept), the feature tables come from the dataset's aligned feature files.

Items without training interactions (cold items, e.g. held out by ``cold_item_share``) are the
case a full-softmax CE loss handles worst: every item is a negative at every step, so the ID rows
and trainable feature rows of items that are never a positive are only ever pushed down (the
default SASRecREVEAL scored NDCG@10 0.000 on such targets). ``cold_items`` (given the training
count of each row) changes that: ``features`` keeps them out of training (their rows are zero
there: no gradient reaches or comes from them, as if they were not yet in the catalogue) and
represents them at evaluation by their loaded features alone (ID part zero, ``gated`` leaving it
out of the softmax); ``neighbour`` also lends each one, at evaluation, what the warm items it
resembles learned: the mean ID embedding of its ``cold_item_neighbours`` nearest warm items (cosine
of the trained model's features-only embeddings) and, with trainable feature tables, their mean
fine-tuning of the feature rows.

A *masked* modality (``masking``) contributes a zero vector in place of its projected embedding
``W f + b`` (the bias does not pass), and with ``gated`` fusion it is left out of the softmax:
the table is then the one an encoder without that modality would build. This is where the
authors mask (YutongLi2024/REVEAL, REVEAL/AVL/M3SRec.py, ``avl_apply_mask`` applied to
``item_image_embeddings = self.fc_mean_image(self.image_mean_embeddings(sequence))``).
"""
from __future__ import annotations

import contextlib
import hashlib
from logging import getLogger
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from reveal_recbole.data.features import ItemFeatures, reduce_features
from reveal_recbole.errors import ConfigError, FeatureFileError

FUSIONS = ("sum", "concat", "gated", "moe")
MISSING_FEATURE_MODES = ("zero", "learned")
SCORE_WITH = ("fused", "id")
COLD_ITEMS = ("auto", "neighbour", "features", "train")


# encoder keys newer than some saved checkpoints: a saved config without them gets these
SETTING_DEFAULTS = {
    "score_with": "fused", "id_dropout": 0.0, "moe_shared_experts": 2, "moe_specific_experts": 4, "moe_low_rank": 4,
    "feature_width": None, "id_shrinkage": 0.0,
}


def encoder_settings(config, modalities) -> dict:
    """The encoder's ``score_with``, ``id_dropout``, ``moe_*`` and ``feature_width`` keyword arguments from a config.

    ``score_with: id`` is refused unless ``loss_type`` is CE: with BPR a backbone looks its
    candidates up through ``item_embedding(ids)``, the call that also embeds the input sequence,
    so the encoder cannot tell them apart and they would be scored fused, silently.
    """
    settings = {key: default if config[key] is None else config[key] for key, default in SETTING_DEFAULTS.items()}
    if settings["score_with"] == "id" and modalities and config["loss_type"] != "CE":
        raise ConfigError(
            f"score_with: id needs loss_type: CE, got {config['loss_type']!r}: with BPR the backbone looks its "
            "candidates up through item_embedding(ids), the call that embeds the input sequence, so they would be "
            "scored with the fused embeddings; use loss_type: CE or score_with: fused"
        )
    return settings


def _expert(in_dim: int, dim: int) -> nn.Sequential:
    """The authors' ``Expert``: Linear -> GELU -> Linear, hidden size = the embedding size."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


def _router(in_dim: int, hidden: int, experts: int) -> nn.Sequential:
    """The authors' low-rank gate (``dnn*``): Linear -> GELU -> Linear, no biases; softmax applied by the caller."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, experts, bias=False))


def add_all(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of same-shaped tensors by chained adds: ``torch.stack(...).sum(0)`` over an item table is a
    strided reduction, 10x slower on the CPU (72 ms against 7 ms for three 100,000 x 64 tables)."""
    tensors = iter(tensors)
    total = next(tensors)
    for tensor in tensors:
        total = total + tensor
    return total


def weighted_sum(parts: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[:, k] * parts[k]`` for ``(rows, dim)`` parts and ``(rows, K)`` weights, without stacking."""
    return add_all(part * weights[:, k:k + 1] for k, part in enumerate(parts))


def _mix(experts: nn.ModuleList, router: nn.Sequential, expert_input: torch.Tensor, router_input: torch.Tensor):
    weights = torch.softmax(router(router_input), dim=-1)  # (rows, experts)
    return weighted_sum([expert(expert_input) for expert in experts], weights)


def id_count_scale(training_counts: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``n / (n + shrinkage)`` per ID row, ``n`` its training interactions; rows that are not items (-1) keep 1.

    The weight a row's ID gets against its features: 0 for an item never trained on, half at
    ``shrinkage`` interactions, towards 1 for popular items (a shrinkage estimate's weight).
    """
    counts = training_counts.to(torch.float32)
    return torch.where(counts < 0, torch.ones_like(counts), counts / (counts.clamp(min=0) + shrinkage))


@contextlib.contextmanager
def masked_modalities(module: nn.Module, modalities: Iterable[str]) -> Iterator[None]:
    """Add ``modalities`` to ``module.masked_modalities`` for the block; a modality it lacks is a ``KeyError``.

    The one masking mechanism of every model with modalities (the REVEAL encoder, UniSRec, the
    feature-aware RecBole models): AVL and the utilisation diagnostics call their ``masking``.
    """
    modalities = frozenset(modalities)
    unknown = modalities - set(module.modalities)
    if unknown:
        raise KeyError(f"cannot mask {sorted(unknown)}: the modalities are {list(module.modalities)}")
    previous = module.masked_modalities
    module.masked_modalities = previous | modalities
    try:
        yield
    finally:
        module.masked_modalities = previous


class FeatureDropout(nn.Dropout):
    """``nn.Dropout`` whose keep mask comes from ``rand_like`` and a compare (same distribution, other stream).

    It runs on every item's projected features at every step; on the CPU ``bernoulli_`` made that 1.6x
    slower (forward and backward over a 100,000 x 64 table: 70 ms against 44 ms on one core).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        return x * (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1 / (1 - self.p))


class MixtureOfExperts(nn.Module):
    """The REVEAL authors' fusion (M3SRec's "multi-scale multimodal fusion layer"), applied per item.

    From YutongLi2024/REVEAL, M3SRec/M3SRec.py and REVEAL/AVL/M3SRec.py (``add_position_mean_embedding``)::

        x = cat(e_id, e_v, e_t);  shared = sum_s softmax(dnn_share(x))_s * expert_shared_s(x)
        out_k = sum_p softmax(dnn_k(e_k))_p * expert_k_p(e_k + shared)     for k in id, image, text
        task_out = attention-weighted sum of out_id, out_v, out_t, shared
        e = e_id + e_v + e_t + task_out

    with 2 shared and 4 specific experts per part and gates of width ``dim / low_rank`` (4) by
    default (their ``num_shared_experts``, ``num_specific_experts``, ``low_rank`` in M3SRec/main.py).
    One change: their attention (``attention_layer = nn.Linear(4H, H)``, softmax over the hidden
    axis, then ``gate_1_out[:, 0, :] * attention_scores[:, 0, :]`` ... ``attention_scores[:, 3, :]``)
    weights sequence position 0 with the scores of positions 0-3 and copies the result to all 100
    positions; an item table has no positions, so here a ``Linear((P+1) H, P+1)`` gives each item
    one softmax weight per output, the evident intent. Any number of parts P works.
    """

    def __init__(self, names: tuple[str, ...], dim: int, shared_experts: int = 2, specific_experts: int = 4,
                 low_rank: int = 4):
        super().__init__()
        self.names = names
        hidden = max(int(dim / low_rank), 1)
        width = len(names) * dim
        self.shared_experts = nn.ModuleList(_expert(width, dim) for _ in range(shared_experts))
        self.shared_router = _router(width, hidden, shared_experts)
        self.experts = nn.ModuleDict(
            {name: nn.ModuleList(_expert(dim, dim) for _ in range(specific_experts)) for name in names}
        )
        self.routers = nn.ModuleDict({name: _router(dim, hidden, specific_experts) for name in names})
        self.attention = nn.Linear((len(names) + 1) * dim, len(names) + 1)

    def part_parameters(self, name: str) -> list[nn.Parameter]:
        """One part's own experts and gate (the authors' ``experts_task2_*``, ``dnn2_*`` for the image)."""
        return [*self.experts[name].parameters(), *self.routers[name].parameters()]

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(parts, dim=-1)
        shared = _mix(self.shared_experts, self.shared_router, x, x)
        outputs = [_mix(self.experts[n], self.routers[n], part + shared, part) for n, part in zip(self.names, parts)]
        outputs.append(shared)
        weights = torch.softmax(self.attention(torch.cat(outputs, dim=-1)), dim=-1)
        return add_all(parts) + weighted_sum(outputs, weights)


DIGEST_SUFFIX = "_digest"


def table_digest(table: torch.Tensor) -> torch.Tensor:
    """A 16-byte content digest (uint8 tensor) of a feature table: shape, dtype and every value, a block at a time."""
    digest = hashlib.blake2b(f"{tuple(table.shape)} {table.dtype}".encode(), digest_size=16)
    for block in table.detach().split(65536):
        digest.update(block.contiguous().cpu().numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def tensors_state(tensors: Iterable[torch.Tensor]) -> tuple:
    """A cache key that changes when any of ``tensors`` is updated in place (its version) or replaced
    (its storage: ``load_state_dict`` of a new tensor, ``.to(device)``, ``.double()``)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def check_optional_width(key: str, width) -> None:
    """A width key (``feature_width``, ``feature_neighbours_width``): an integer >= 1, or None for the full width."""
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ConfigError(f"{key} must be an integer >= 1 or ~ (full width), got {width!r}")


class FeatureTables(nn.Module):
    """Each modality's feature rows: parameters when fine-tuned, otherwise frozen data that checkpoints leave out.

    Frozen rows are rebuilt from the feature files with the model, so a checkpoint keeps only their
    digest (``<name>_digest``, checked when it is loaded: a model is never silently paired with other
    features) and is as small as the backbone's plus the projections; storing the rows cost 6.7 GB per
    checkpoint, resume point and FVE round at 1M items x 1,664-d. Frozen rows may share the dataset's memory.
    """

    def __init__(self, trainable: bool):
        super().__init__()
        self.trainable = trainable
        self.names: list[str] = []
        self._digests: dict[str, tuple[tuple, torch.Tensor]] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        if self.trainable:
            self.register_parameter(name, nn.Parameter(values))
        else:
            self.register_buffer(name, values, persistent=False)
        self.names.append(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def digest(self, name: str) -> torch.Tensor:
        """The frozen table's digest, computed once per table content (cached by storage and version)."""
        table = self[name]
        key = (tensors_state([table]), tuple(table.shape))
        if name not in self._digests or self._digests[name][0] != key:
            self._digests[name] = (key, table_digest(table))
        return self._digests[name][1]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.trainable:
            for name in self.names:
                destination[prefix + name + DIGEST_SUFFIX] = self.digest(name).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Check a saved digest (or frozen rows, stored by checkpoints before digests) against the rows built now."""
        if not self.trainable:
            for name in self.names:
                saved = state_dict.pop(prefix + name + DIGEST_SUFFIX, None)
                rows = state_dict.pop(prefix + name, None)
                saved = table_digest(rows) if saved is None and rows is not None else saved
                if saved is not None and not torch.equal(saved.cpu(), self.digest(name)):
                    raise FeatureFileError(
                        f"the checkpoint's model was trained with other {name} features than the feature files give "
                        "now: frozen feature rows are read from the feature files, not stored in checkpoints; "
                        "restore the files it was trained with (feature_dir) or retrain"
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class AdaptedFeatureEncoder(nn.Module):
    """Items as their feature rows through one adaptor per modality (plus an ID row when given an ID table).

    The item encoder of the peers that read features through their own adaptors (UniSRec's MoE adaptor,
    MISSRec's linear ones), maskable and split per modality as :class:`REVEALItemEncoder` is for AVL and the
    diagnostics. How an item's modalities combine is the model's (its subclass).
    """

    score_with = "fused"  # candidates are scored with their features (target buckets, cold items)

    def __init__(self, id_embedding: nn.Embedding | None, features: Mapping[str, ItemFeatures],
                 adaptors: Mapping[str, nn.Module], feature_trainable: bool):
        super().__init__()
        self.id_embedding = id_embedding
        self.modalities = tuple(features)
        self.masked_modalities: frozenset[str] = frozenset()
        self.feature_tables = FeatureTables(feature_trainable)
        for modality, rows in features.items():
            self.feature_tables.add(modality, rows.values.clone() if feature_trainable else rows.values)
        self.adaptors = nn.ModuleDict(adaptors)
        self._catalogue_cache: dict[str, tuple[tuple, torch.Tensor]] = {}

    def masking(self, modalities: Iterable[str]) -> contextlib.AbstractContextManager:
        """Remove ``modalities`` inside the block: their adapted rows are zero."""
        return masked_modalities(self, modalities)

    def train(self, mode: bool = True):
        self._catalogue_cache.clear()
        return super().train(mode)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        if modality not in self.modalities:
            raise KeyError(f"modality {modality!r} not in encoder modalities {self.modalities}")
        return [p for p in (self.feature_tables[modality], *self.adaptors[modality].parameters()) if p.requires_grad]

    def adapted(self, modality: str, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The adaptor's output for ``ids`` (any shape; every item when None); zero while masked."""
        if ids is None:
            rows = self.catalogue_rows(modality)
        else:
            rows = self.adaptors[modality](self.feature_tables[modality][ids])
        return torch.zeros_like(rows) if modality in self.masked_modalities else rows

    def catalogue_rows(self, modality: str) -> torch.Tensor:
        """Every item's adapted rows. In evaluation without gradients, computed once per state of the adaptor
        and table: every ranking batch scores against the same rows (UniSRec's adaptor over a 100k-item
        catalogue was three quarters of a batch's time)."""
        table, adaptor = self.feature_tables[modality], self.adaptors[modality]
        if self.training or torch.is_grad_enabled():
            return adaptor(table)
        key = tensors_state((table, *adaptor.parameters()))
        cached = self._catalogue_cache.get(modality)
        if cached is None or cached[0] != key:
            cached = self._catalogue_cache[modality] = (key, adaptor(table))
        return cached[1]

    def with_id(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` plus the items' ID rows (transductive); ``rows`` alone without an ID table (inductive)."""
        if self.id_embedding is None:
            return rows
        return rows + (self.id_embedding.weight if ids is None else self.id_embedding(ids))


class REVEALItemEncoder(nn.Module):
    """Fuses an ID embedding with projected per-modality item features.

    Args:
        id_embedding: the backbone's item table; its row count (e.g. BERT4Rec's extra mask
            token) sets the encoder's; rows beyond the features (the mask token) count as items
            without a feature. The padding row's output is kept at zero.
        item_features: aligned features per modality (``dataset.item_features``).
        fusion: ``sum`` (ID + modalities), ``concat`` (linear map of the concatenation),
            ``gated`` (softmax weights over the parts, scored per item by each part's own head) or
            ``moe`` (the authors' mixture of experts, :class:`MixtureOfExperts`).
        feature_trainable: fine-tune the feature tables (as the REVEAL authors do) or freeze them
            (:class:`FeatureTables`: frozen rows are not stored in checkpoints).
        feature_dropout: dropout on each projected modality embedding.
        missing_feature: ``zero`` input or a ``learned`` vector for items without a feature.
        feature_norm: ``l2`` normalises each feature row at load time; ``none`` keeps it as is.
        score_with: ``fused``: candidates are scored with the fused table (``.weight``), as inputs
            are embedded; ``id``: ``.weight`` is the ID table, so only the input sequence sees the
            features (the authors' choice: their ``predict_full`` reads ``item_embeddings.weight``).
        id_dropout: in training, each item's ID part is zeroed with this probability, so the
            model must also recognise items by their features (keeps the IDs from crowding them out).
        id_shrinkage: ``k``: each item's ID part is scaled by ``n / (n + k)``, ``n`` its training
            interactions (``training_counts``), so an item is carried by its features in proportion
            to how little its ID row could learn: a cold item (``n = 0``) by its features alone, a
            popular one by both. 0 = off. Needs ``training_counts`` and a modality.
        training_counts: training interactions per row of the ID table (the training split's);
            -1 for rows that are not items (padding, BERT4Rec's mask token). Rows with 0 are cold.
        cold_items: ``train``: cold items are trained like any item (as negatives only);
            ``features``: absent in training (zero rows), their loaded features alone at
            evaluation; ``neighbour``: as ``features``, plus at evaluation the mean ID embedding
            (and mean feature-row fine-tuning) of the nearest warm items (cosine of the
            features-only embeddings).
        cold_item_neighbours: ``neighbour``: how many nearest warm items lend to a cold one.
        moe_shared_experts, moe_specific_experts, moe_low_rank: the ``moe`` fusion's sizes.
        feature_width: project each modality's (normalised) rows once, at build time, on their
            leading principal components (:func:`~reveal_recbole.data.features.reduce_features`), so
            the table every training step rebuilds costs ``items x feature_width x hidden`` instead
            of ``items x dim x hidden``; ``None`` keeps the full width.
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
        score_with: str = "fused",
        id_dropout: float = 0.0,
        id_shrinkage: float = 0.0,
        training_counts: torch.Tensor | None = None,
        cold_items: str = "train",
        cold_item_neighbours: int = 2,
        moe_shared_experts: int = 2,
        moe_specific_experts: int = 4,
        moe_low_rank: int = 4,
        feature_width: int | None = None,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if missing_feature not in MISSING_FEATURE_MODES:
            raise ConfigError(f"missing_feature must be one of {MISSING_FEATURE_MODES}, got {missing_feature!r}")
        if feature_norm not in ("l2", "none"):
            raise ConfigError(f"feature_norm must be 'l2' or 'none', got {feature_norm!r}")
        if score_with not in SCORE_WITH:
            raise ConfigError(f"score_with must be one of {SCORE_WITH}, got {score_with!r}")
        if isinstance(id_dropout, bool) or not isinstance(id_dropout, (int, float)) or not 0 <= id_dropout < 1:
            raise ConfigError(f"id_dropout must be a number in [0, 1), got {id_dropout!r}")
        if id_dropout > 0 and not item_features:
            raise ConfigError(
                "id_dropout needs at least one modality: without features a dropped ID leaves a zero item"
            )
        if isinstance(id_shrinkage, bool) or not isinstance(id_shrinkage, (int, float)) or id_shrinkage < 0:
            raise ConfigError(f"id_shrinkage must be a number >= 0 (0 = off), got {id_shrinkage!r}")
        if id_shrinkage > 0 and (not item_features or training_counts is None):
            raise ConfigError("id_shrinkage needs at least one modality and the training counts: a shrunk ID "
                              "leaves the features to carry the item")
        if cold_items not in COLD_ITEMS[1:]:
            raise ConfigError(f"cold_items must be one of {COLD_ITEMS[1:]}, got {cold_items!r}")
        neighbours = cold_item_neighbours
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ConfigError(f"cold_item_neighbours must be an integer >= 1, got {cold_item_neighbours!r}")
        if training_counts is not None and tuple(training_counts.shape) != (id_embedding.num_embeddings,):
            raise ValueError(f"training_counts must have one entry per ID row ({id_embedding.num_embeddings}), "
                             f"got shape {tuple(training_counts.shape)}")
        cold_rows = None
        if cold_items != "train":
            if training_counts is None:
                raise ValueError(f"cold_items: {cold_items} needs training_counts (the training split's count per row)")
            if not item_features:
                raise ConfigError(
                    f"cold_items: {cold_items} needs at least one modality: an item without training interactions "
                    "and without features would be a zero vector"
                )
            cold_rows = training_counts == 0
            cold_rows = cold_rows if bool(cold_rows.any()) else None
        for key, value in (("moe_shared_experts", moe_shared_experts), ("moe_specific_experts", moe_specific_experts),
                           ("moe_low_rank", moe_low_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        check_optional_width("feature_width", feature_width)
        self.id_embedding = id_embedding
        self.num_embeddings = id_embedding.num_embeddings
        self.embedding_dim = id_embedding.embedding_dim
        self.padding_idx = id_embedding.padding_idx
        self.fusion = fusion
        self.score_with = score_with
        self.id_dropout = float(id_dropout)
        self.modalities = tuple(item_features)
        self.masked_modalities: frozenset[str] = frozenset()
        self._table_cache: tuple[tuple, torch.Tensor] | None = None
        self._projection_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._share_depth = 0
        self.dropped_ids: torch.Tensor | None = None  # the rows whose ID part the last training table dropped

        # data-derived, rebuilt with the model from its training split: not part of checkpoints
        self.cold_items = cold_items if cold_rows is not None else "train"
        self.cold_item_neighbours = cold_item_neighbours
        self.register_buffer("cold_rows", cold_rows, persistent=False)
        self.register_buffer("warm_rows", None if cold_rows is None else training_counts > 0, persistent=False)
        self.id_shrinkage = float(id_shrinkage)
        self.register_buffer("training_counts", training_counts, persistent=False)
        self.register_buffer("id_scale", id_count_scale(training_counts, id_shrinkage) if id_shrinkage > 0 else None,
                             persistent=False)
        self.feature_tables = FeatureTables(feature_trainable)
        self.projections = nn.ModuleDict()
        self.missing_vectors = nn.ParameterDict()
        for modality, features in item_features.items():
            values, present = self._fit_rows(features)
            if feature_norm == "l2" and not features.unit_norm:
                values = F.normalize(values, dim=1).mul_(present.unsqueeze(1))
            if feature_width is not None and feature_width < values.shape[1]:
                getLogger().info(f"{modality} features: {values.shape[1]}-d rows reduced to their {feature_width} "
                                 "leading principal components (feature_width)")
                values = reduce_features(values, present, feature_width)
            if feature_trainable and values is features.values:  # trained rows must not write into the dataset's
                values = values.clone()
            self.feature_tables.add(modality, values)
            self.register_buffer(f"present_{modality}", present)
            self.projections[modality] = nn.Linear(values.shape[1], self.embedding_dim)
            if missing_feature == "learned":
                self.missing_vectors[modality] = nn.Parameter(torch.zeros(values.shape[1]))
            if cold_rows is not None and feature_trainable:  # the loaded rows: cold items keep theirs
                self.register_buffer(f"loaded_{modality}", values.clone(), persistent=False)
        self.dropout = FeatureDropout(feature_dropout)
        parts = 1 + len(self.modalities)
        if fusion == "concat" and self.modalities:
            self.concat_projection = nn.Linear(parts * self.embedding_dim, self.embedding_dim)
        if fusion == "gated":
            self.gate_heads = nn.ModuleDict(
                {name: nn.Linear(self.embedding_dim, 1) for name in ("id",) + self.modalities}
            )
        if fusion == "moe" and self.modalities:
            self.moe = MixtureOfExperts(
                ("id",) + self.modalities, self.embedding_dim, moe_shared_experts, moe_specific_experts, moe_low_rank
            )
        self.register_buffer("_padding_index", torch.tensor([self.padding_idx or 0]), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.clear_cache())

    def _fit_rows(self, features: ItemFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (or cut) feature rows to the ID table's size; extra rows have no feature. No copy when they fit."""
        if features.values.shape[0] == self.num_embeddings:
            return features.values, features.present
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
        if self.fusion == "moe":
            params.extend(self.moe.part_parameters(modality))
        return [p for p in params if p.requires_grad]

    def masking(self, modalities: Iterable[str]) -> contextlib.AbstractContextManager:
        """Remove ``modalities`` for the forward passes inside the block.

        A masked modality's projected embedding is zero (no projection bias passes) and ``gated``
        fusion gives it no share: the table equals that of an encoder built without it (the
        ``moe`` fusion, as the authors', runs its experts on the zero vector). AVL's masked losses
        and the visual-utilisation diagnostics both mask through here.
        """
        return masked_modalities(self, modalities)

    # ----------------------------------------------------------------- the fused table
    def modality_input(self, modality: str, neighbours: torch.Tensor | None = None) -> torch.Tensor:
        """The feature rows fed to a modality's projection (the learned vector where an item has none).

        Cold items keep their loaded rows; with ``neighbours`` (``(cold, k)`` warm rows) they also
        get the mean fine-tuning (trained minus loaded row) of those warm items.
        """
        table = self.feature_tables[modality]
        loaded = getattr(self, f"loaded_{modality}", None)
        if loaded is not None:
            cold_input = loaded[self.cold_rows]
            if neighbours is not None:
                cold_input = cold_input + (table[neighbours] - loaded[neighbours]).mean(1)
            table = table.index_put((self.cold_rows,), cold_input)
        if modality in self.missing_vectors:
            present = getattr(self, f"present_{modality}").unsqueeze(1)
            return torch.where(present, table, self.missing_vectors[modality])
        return table

    def modality_embedding(self, modality: str, neighbours: torch.Tensor | None = None) -> torch.Tensor | None:
        """``drop(W f + b)`` for every item; ``None`` while the modality is masked."""
        if modality in self.masked_modalities:
            return None
        return self.dropout(self.projection(modality, neighbours))

    def projection(self, modality: str, neighbours: torch.Tensor | None = None) -> torch.Tensor:
        """``W f + b`` for every item, computed once per parameter state.

        Within a training step the loss pass and AVL's two masked passes (which run before the
        optimiser changes anything) need the same projections: without grad the masked passes reuse
        the loss pass's (detached), instead of projecting every item's features again.
        """
        if neighbours is not None:  # cold items' inputs borrow from their neighbours: not the cached rows
            return self.projections[modality](self.modality_input(modality, neighbours))
        key = self._cache_key()[0]
        cached = self._projection_cache.get(modality)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        projected = self.projections[modality](self.modality_input(modality))
        self._projection_cache[modality] = (key, projected.detach())
        return projected

    def id_part(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ID rows and, in training with ``id_dropout``, which rows were kept.

        A dropped row is zeroed without rescaling the kept ones: at evaluation every item has its
        ID, a case training also sees, rather than a 1/(1-p)-scaled ID training never matched.
        Cold items (``cold_items`` other than ``train``) have no ID part of their own; with
        ``id_shrinkage`` every row is scaled by its item's count (:func:`id_count_scale`). The
        rows dropped this step are kept in ``dropped_ids``: the neighbour term treats them as new.
        """
        weight = self.id_embedding.weight
        if self.id_scale is not None:
            weight = weight * self.id_scale.unsqueeze(1)
        kept = None if self.cold_rows is None else ~self.cold_rows
        self.dropped_ids = None
        if self.training and self.id_dropout > 0:
            drawn = torch.rand(weight.shape[0], device=weight.device) >= self.id_dropout
            self.dropped_ids = ~drawn
            kept = drawn if kept is None else kept & drawn
        if kept is None:
            return weight, None
        return weight * kept.unsqueeze(1).to(weight.dtype), kept

    def nearest_warm_items(self, features_only: torch.Tensor) -> torch.Tensor:
        """``(cold, k)``: for each cold row, the ``cold_item_neighbours`` warm rows whose features-only embeddings
        (the fused table with every ID part removed) are nearest by cosine."""
        unit = F.normalize(features_only.detach(), dim=1)
        warm_ids = torch.nonzero(self.warm_rows).squeeze(1)
        k = min(self.cold_item_neighbours, len(warm_ids))
        neighbours = []
        for chunk in unit[self.cold_rows].split(4096):  # (cold, warm) similarities, a chunk at a time
            neighbours.append(warm_ids[(chunk @ unit[warm_ids].T).topk(k, dim=1).indices])
        return torch.cat(neighbours)

    def fuse(self, parts: list[torch.Tensor], kept: list[torch.Tensor | bool | None] | None = None) -> torch.Tensor:
        """Fuse ID and modality parts; ``kept[i]`` is ``None`` (all rows), ``False`` (part removed) or one bool per row.

        Removed parts are zero vectors; ``gated`` also takes them out of the softmax.
        """
        if len(parts) == 1:
            return parts[0]
        if self.fusion == "sum":
            return add_all(parts)
        if self.fusion == "concat":
            return self.concat_projection(torch.cat(parts, dim=-1))
        if self.fusion == "moe":
            return self.moe(parts)
        names = ("id",) + self.modalities
        logits = torch.cat([self.gate_heads[n](p) for n, p in zip(names, parts)], dim=-1)
        if kept is not None and any(k is not None for k in kept):
            present = torch.ones_like(logits, dtype=torch.bool)
            for column, k in enumerate(kept):
                if k is not None:
                    present[:, column] = k
            present |= ~present.any(-1, keepdim=True)  # every part removed: all are zero, any weights do
            logits = logits.masked_fill(~present, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return weighted_sum(parts, weights)

    def modality_parts(self, like: torch.Tensor, neighbours: torch.Tensor | None = None) -> tuple[list, list]:
        """Each modality's embedding (zeros while masked) and its ``kept`` entry for :meth:`fuse`."""
        parts, kept = [], []
        for modality in self.modalities:
            embedding = self.modality_embedding(modality, neighbours)
            parts.append(torch.zeros_like(like) if embedding is None else embedding)
            kept.append(False if embedding is None else None)
        return parts, kept

    def compute_table(self) -> torch.Tensor:
        id_rows, id_kept = self.id_part()
        parts, kept = self.modality_parts(id_rows)
        if self.cold_items == "neighbour" and not self.training:  # cold items borrow from the warm items they resemble
            neighbours = self.nearest_warm_items(self.fuse([torch.zeros_like(id_rows), *parts], [False, *kept]))
            lent = self.id_embedding.weight[neighbours]
            if self.id_scale is not None:  # what the neighbours' IDs contribute to their own rows
                lent = lent * self.id_scale[neighbours].unsqueeze(2)
            id_rows, id_kept = id_rows.index_put((self.cold_rows,), lent.mean(1)), None
            if any(hasattr(self, f"loaded_{m}") for m in self.modalities):
                parts, kept = self.modality_parts(id_rows, neighbours)
        table = self.fuse([id_rows, *parts], [id_kept, *kept])
        if self.cold_rows is not None and self.training:  # cold items are not in the catalogue yet
            table = table * (~self.cold_rows).unsqueeze(1).to(table.dtype)
        if self.padding_idx is not None:  # keep RecBole's padding item at zero, as nn.Embedding does
            table = table.index_fill(0, self._padding_index, 0.0)
        return table

    def _cache_key(self) -> tuple:
        state = tensors_state((*self.parameters(), *self.feature_tables.buffers()))
        return (state, self.masked_modalities, self.training, torch.is_grad_enabled())

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
        """The table candidates are scored against (full ranking, CE): fused, or the ID table (``score_with="id"``)."""
        if self.score_with == "id":
            return self.id_embedding.weight
        return self.table()

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        if not self.modalities:
            return self.id_embedding(item_ids)
        if self.score_with == "id" and self.cold_rows is None:  # candidates are scored by ID: fuse only these
            unique, inverse = torch.unique(item_ids, return_inverse=True)
            return F.embedding(inverse, self.fused_rows(unique))
        return F.embedding(item_ids, self.table())

    def fused_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``compute_table()[ids]`` for distinct ``ids``, computing only those rows.

        With ``score_with: id`` the fused table embeds the input sequence alone, so a step needs the
        rows of its batch's items (at most batch x length), not the catalogue's: the projections and
        the ``moe`` experts then cost the same at 1M items as at 1,000. Dropout is drawn per row as the
        full table draws it; cold-item handling (which needs every row) keeps the full table.
        """
        id_rows = self.id_embedding.weight[ids]
        if self.id_scale is not None:
            id_rows = id_rows * self.id_scale[ids].unsqueeze(1)
        id_kept = None
        if self.training and self.id_dropout > 0:
            id_kept = torch.rand(len(ids), device=id_rows.device) >= self.id_dropout
            id_rows = id_rows * id_kept.unsqueeze(1).to(id_rows.dtype)
        parts, kept = [], []
        for modality in self.modalities:
            if modality in self.masked_modalities:
                parts.append(torch.zeros_like(id_rows))
                kept.append(False)
                continue
            inputs = self.feature_tables[modality][ids]
            if modality in self.missing_vectors:
                present = getattr(self, f"present_{modality}")[ids].unsqueeze(1)
                inputs = torch.where(present, inputs, self.missing_vectors[modality])
            parts.append(self.dropout(self.projections[modality](inputs)))
            kept.append(None)
        rows = self.fuse([id_rows, *parts], [id_kept, *kept])
        if self.padding_idx is not None:
            rows = rows.masked_fill((ids == self.padding_idx).unsqueeze(1), 0.0)
        return rows

    def extra_repr(self) -> str:
        cold = 0 if self.cold_rows is None else int(self.cold_rows.sum())
        return (f"modalities={list(self.modalities)}, fusion={self.fusion}, score_with={self.score_with}"
                + (f", cold_items={self.cold_items} ({cold} items)" if cold else ""))
