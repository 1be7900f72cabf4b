"""Where the prompt looks, measured: the share of an encoder's patch weight on the item's own region.

REVEAL's claim for FVE is more "attention to preference-relevant visual regions". On a dataset
that records where each item's own object is (``<dataset>.regions.tsv``, written by
``dataset_prep/make_synthetic.py --distractors``; analysis only, no model input), this is a
number: :func:`region_attention_mass`, the pooling weight a prompt-conditioned encoder puts on
the patches that overlap the item's region. Uniform pooling puts :func:`uniform_mass` there.

``regions.tsv``: a header, then ``item_id<TAB>x0<TAB>y0<TAB>x1<TAB>y1<TAB>width<TAB>height``
(pixels, end exclusive; more columns are ignored). Patches are the cells of a square grid laid
over the whole image (the encoders resize without cropping), patch ``k`` at row ``k // side``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from reveal_recbole.image_io import ImageRejected, decode_image

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image's width and height


def read_item_regions(path: str | os.PathLike) -> dict[str, Box]:
    """Item token -> its region as fractions of the image, from a ``regions.tsv``; {} when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    regions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        values = line.split("\t")
        if number == 1 and values[0].split(":")[0] == "item_id" or not line.strip():
            continue
        try:
            x0, y0, x1, y1, width, height = (float(v) for v in values[1:7])
        except ValueError:
            raise ValueError(f"{path}, line {number}: need item_id x0 y0 x1 y1 width height, got {line!r}") from None
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"{path}, line {number}: the box {x0, y0, x1, y1} is not inside {width} x {height}")
        regions[values[0]] = (x0 / width, y0 / height, x1 / width, y1 / height)
    return regions


def region_patches(box: Box, patches: int) -> np.ndarray:
    """``(patches,)`` bool: the cells of the square patch grid that overlap ``box`` with positive area."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patches do not form a square grid")
    edges = np.arange(side + 1) / side
    x0, y0, x1, y1 = box
    columns = (edges[:-1] < x1) & (edges[1:] > x0)
    rows = (edges[:-1] < y1) & (edges[1:] > y0)
    return (rows[:, None] & columns[None, :]).ravel()


def region_attention_mass(weights: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """``(B,)`` share of each row of pooling weights ``(B, P)`` on the patches overlapping its box."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(boxes):
        raise ValueError(f"{len(weights)} weight rows but {len(boxes)} boxes")
    inside = np.stack([region_patches(box, weights.shape[1]) for box in boxes]) if len(boxes) else weights > 0
    return (weights * inside).sum(axis=1) / weights.sum(axis=1)


def uniform_mass(boxes: Sequence[Box], patches: int) -> float:
    """The mean region mass of uniform pooling (the share of patches overlapping each box): the no-prompt level."""
    return float(np.mean([region_patches(box, patches).mean() for box in boxes])) if boxes else math.nan


class RegionAttention:
    """Region attention mass of a patch-pooling encoder's prompts over the items that have a region.

    The images are read and, for an encoder with ``patch_embeddings`` and ``pooling_weights`` (the
    aligned encoder), embedded once; each call then only encodes the prompts. Other encoders need
    ``patch_weights(images, prompts)`` and run whole each time.
    """

    def __init__(self, encoder, regions: Mapping[str, Box], image_paths: Mapping[str, Path | None],
                 batch_size: int = 64):
        self.encoder, self.batch_size = encoder, batch_size
        self.tokens, self.boxes, self.images = [], [], []
        for token, box in regions.items():
            path = image_paths.get(token)
            if path is None:
                continue
            try:
                image = encoder.prepare(decode_image(Path(path).read_bytes()))
            except (OSError, ImageRejected) as error:
                logger.warning("region attention: skipping item %s (%s)", token, error)
                continue
            self.tokens.append(token)
            self.boxes.append(box)
            self.images.append(image)
        self._embedded = None

    @staticmethod
    def supports(encoder) -> bool:
        return hasattr(encoder, "patch_weights")

    def _embeddings(self) -> list:
        """The images' projected patches, in batches, computed on first use."""
        if self._embedded is None:
            self._embedded = [self.encoder.patch_embeddings(self.images[s:s + self.batch_size])
                              for s in range(0, len(self.images), self.batch_size)]
        return self._embedded

    def _weights(self, prompts: list[str]) -> np.ndarray:
        size = self.batch_size
        if hasattr(self.encoder, "patch_embeddings"):
            return np.concatenate([self.encoder.pooling_weights(block, prompts[k * size:(k + 1) * size]).numpy()
                                   for k, block in enumerate(self._embeddings())])
        return np.concatenate([self.encoder.patch_weights(self.images[s:s + size], prompts[s:s + size])
                               for s in range(0, len(self.images), size)])

    def mass(self, prompts: Mapping[str, str]) -> dict[str, float]:
        """Item token -> region attention mass under its prompt in ``prompts``."""
        if not self.tokens:
            return {}
        weights = self._weights([prompts[t] for t in self.tokens])
        return dict(zip(self.tokens, region_attention_mass(weights, self.boxes).tolist()))

    def uniform(self) -> float:
        """:func:`uniform_mass` on the encoder's patch grid."""
        if not self.tokens:
            return math.nan
        if hasattr(self.encoder, "patch_embeddings"):
            patches = self._embeddings()[0].shape[1]
        else:
            patches = self.encoder.patch_weights(self.images[:1], [""]).shape[1]
        return uniform_mass(self.boxes, patches)


def attention_summary(before: Mapping[str, float], after: Mapping[str, float], changed: Iterable[str],
                      uniform: float) -> dict:
    """A round's region attention: the mean mass over all items under the new prompts, and over the
    items whose prompt changed under their new and their old prompt (None when none changed), with
    the uniform-pooling level to read them against."""
    changed = [token for token in changed if token in after and token in before]

    def mean(values) -> float | None:
        values = list(values)
        return float(np.mean(values)) if values else None

    return {"mean": mean(after.values()), "changed": mean(after[t] for t in changed),
            "changed_before": mean(before[t] for t in changed), "changed_items": len(changed), "uniform": uniform}
