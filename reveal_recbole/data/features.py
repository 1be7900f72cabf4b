"""Item feature files: one per modality, keyed by item token, aligned to RecBole's internal ids.

Format (documented in the README): ``<dataset>.<modality>.npy`` holds a float array of shape
``(rows, dim)`` and ``<dataset>.<modality>.items`` holds one item token per line, line ``i``
naming row ``i``. Rows are matched to items by token, never by position, so a file written
for a superset of items, or in any order, attaches to the right items.
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reveal_recbole.atomic import atomic_write_bytes, atomic_write_text
from reveal_recbole.errors import FeatureFileError

logger = logging.getLogger(__name__)

LOAD_CHUNK_ROWS = 65536  # feature rows read, checked and normalised at a time


@dataclass
class ItemFeatures:
    """Per-item features of one modality, row ``i`` belonging to internal item id ``i``."""

    values: torch.Tensor  # (n_items, dim) float32, zeros where ``present`` is False
    present: torch.Tensor  # (n_items,) bool
    source: str
    unit_norm: bool = False  # rows already L2-normalised at load (``feature_norm: l2``): the encoder shares them

    @property
    def dim(self) -> int:
        return self.values.shape[1]


def feature_paths(feature_dir: str | os.PathLike, dataset: str, modality: str) -> tuple[Path, Path]:
    base = Path(feature_dir) / f"{dataset}.{modality}"
    return base.with_name(base.name + ".npy"), base.with_name(base.name + ".items")


def write_item_features(
    feature_dir: str | os.PathLike, dataset: str, modality: str, tokens: Sequence[str], values: np.ndarray
) -> tuple[Path, Path]:
    """Write a feature file pair atomically (array first, token list last)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[0] != len(tokens):
        raise ValueError(f"features of shape {values.shape} do not match {len(tokens)} item tokens")
    npy_path, items_path = feature_paths(feature_dir, dataset, modality)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    atomic_write_bytes(npy_path, buffer.getvalue())
    atomic_write_text(items_path, "\n".join(tokens) + "\n")
    return npy_path, items_path


def read_feature_file(npy_path: Path, items_path: Path) -> tuple[list[str], np.ndarray]:
    """Open a feature pair (memory-mapped) and check its shape, dtype and token list."""
    for path in (npy_path, items_path):
        if not path.is_file():
            raise FileNotFoundError(f"feature file not found: {path}")
    try:
        array = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as error:  # EOFError: a zero-byte file
        raise FeatureFileError(f"{npy_path}: not a readable .npy array ({error})") from None
    if array.ndim != 2:
        raise FeatureFileError(f"{npy_path}: expected a 2-D (items, dim) array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise FeatureFileError(f"{npy_path}: empty feature array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise FeatureFileError(f"{npy_path}: expected a floating-point array, got dtype {array.dtype}")
    try:
        tokens = items_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise FeatureFileError(f"{items_path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if len(tokens) != array.shape[0]:
        raise FeatureFileError(
            f"{items_path}: {len(tokens)} item tokens but {npy_path.name} has {array.shape[0]} rows"
        )
    duplicates = sorted(token for token, count in Counter(tokens).items() if count > 1)
    if duplicates:
        raise FeatureFileError(f"{items_path}: duplicate item tokens {duplicates[:5]}")
    return tokens, array


def align_item_features(
    tokens: Sequence[str],
    array: np.ndarray,
    token_to_id: Mapping[str, int],
    n_items: int,
    source: str,
    strict: bool = True,
    normalise: bool = False,
) -> ItemFeatures:
    """Place each row at its item's internal id; items without a row are marked missing.

    Rows are copied from the (memory-mapped) array a chunk at a time straight into the one
    ``(n_items, dim)`` table, and L2-normalised there with ``normalise``: loading holds one copy of
    the features, not the two or three a gather, a cast and a normalisation would each make.
    """
    rows, ids, unknown = [], [], []
    for row, token in enumerate(tokens):
        item_id = token_to_id.get(token)
        if item_id is None:
            unknown.append(token)
        else:
            rows.append(row)
            ids.append(item_id)
    if not ids:
        raise FeatureFileError(f"{source}: none of its {len(tokens)} item tokens is an item of the dataset")
    if unknown and strict:
        raise FeatureFileError(
            f"{source}: {len(unknown)} item tokens are not items of the dataset, e.g. {unknown[:5]} "
            "(set strict_feature_items: False to ignore them)"
        )
    if unknown:
        logger.warning("%s: ignored %d rows whose item tokens are not in the dataset", source, len(unknown))
    values = torch.zeros(n_items, array.shape[1], dtype=torch.float32)
    present = torch.zeros(n_items, dtype=torch.bool)
    rows, ids = np.asarray(rows), torch.as_tensor(ids, dtype=torch.long)
    order = np.argsort(rows, kind="stable")  # read the file front to back
    for chunk in np.array_split(order, max(1, -(-len(order) // LOAD_CHUNK_ROWS))):
        selected = torch.from_numpy(np.asarray(array[rows[chunk]], dtype=np.float32))
        finite = torch.isfinite(selected).all(dim=1)
        if not bool(finite.all()):
            bad = [tokens[rows[chunk][i]] for i in torch.nonzero(~finite).squeeze(1)[:5].tolist()]
            raise FeatureFileError(f"{source}: NaN or inf values in the rows of items {bad}")
        if normalise:
            selected = F.normalize(selected, dim=1)
        values[ids[chunk]] = selected
    present[ids] = True
    return ItemFeatures(values=values, present=present, source=source, unit_norm=normalise)


def principal_directions(
    values: torch.Tensor, present: torch.Tensor, width: int, max_rows: int = 65536, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the ``width`` leading principal directions ``(dim, width)`` of the present rows.

    Fitted on a seeded sample of at most ``max_rows`` rows: at a million items the directions of
    65,536 rows are the catalogue's up to sampling noise, for the cost of one ``dim x dim`` covariance.
    """
    rows = torch.nonzero(present).squeeze(1)
    if len(rows) > max_rows:
        generator = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=generator)[:max_rows]].sort().values
    sample = values[rows].double()
    mean = sample.mean(0)
    centred = sample - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    directions = vectors[:, -width:].flip(1)
    signs = torch.sign(directions[directions.abs().argmax(0), torch.arange(directions.shape[1])])
    return mean.float(), (directions * signs).float()  # signs fixed: the same rows give the same table


def reduce_features(values: torch.Tensor, present: torch.Tensor, width: int) -> torch.Tensor:
    """Rows projected on their ``width`` leading principal components (centred); rows without a feature stay zero.

    The offline half of a cheap training step: the encoder's per-step projection of every item then
    costs ``items x width x hidden`` instead of ``items x dim x hidden`` (``feature_width``).
    """
    mean, directions = principal_directions(values, present, width)
    reduced = torch.empty(values.shape[0], directions.shape[1], dtype=torch.float32)
    for start in range(0, values.shape[0], LOAD_CHUNK_ROWS):
        stop = start + LOAD_CHUNK_ROWS
        reduced[start:stop] = (values[start:stop] - mean) @ directions
    return reduced.mul_(present.unsqueeze(1))


def load_item_features(
    feature_dir: str | os.PathLike,
    dataset: str,
    modalities: Sequence[str],
    token_to_id: Mapping[str, int],
    n_items: int,
    strict: bool = True,
    normalise: bool = False,
) -> dict[str, ItemFeatures]:
    """Load and align every requested modality (L2-normalised rows with ``normalise``); log items without one."""
    features = {}
    for modality in modalities:
        npy_path, items_path = feature_paths(feature_dir, dataset, modality)
        tokens, array = read_feature_file(npy_path, items_path)
        aligned = align_item_features(tokens, array, token_to_id, n_items, str(npy_path), strict, normalise)
        missing = int((~aligned.present[1:]).sum())  # id 0 is RecBole's padding item
        logger.info(
            "%s features: %d-d from %s, %d of %d items without a feature",
            modality, aligned.dim, npy_path, missing, n_items - 1,
        )
        features[modality] = aligned
    return features
