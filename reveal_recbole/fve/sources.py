"""Where FVE finds each item's image, metadata and reviews: plain files beside the dataset.

REVEAL's prompts are built from an item's metadata and reviews, and its features from the
item's picture, so the FVE loop needs all three by item token:

- images: ``<image_dir>/<item token>.<png|jpg|jpeg|webp>`` (config key ``image_dir``,
  default ``<data_path>/images``, as ``dataset_prep/make_synthetic.py`` writes them);
- metadata: ``<data_path>/<dataset>.item``, the RecBole atomic file the dataset_prep
  converters write (``item_id title categories brand description`` and optionally
  ``keywords``, tab-separated, ``name:type`` headers);
- reviews (optional): ``<data_path>/<dataset>.reviews``, one review per line as
  ``item_id<TAB>review text`` (a header line starting with ``item_id`` is skipped).

Missing files and missing items are not errors: an item without an image gets the fixed
fallback vector of :func:`reveal_recbole.fve.extract.missing_image_vector`, an item without
metadata or reviews gets the template's defaults.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # preference order when a token has several
METADATA_FIELDS = ("title", "categories", "brand", "description", "keywords")


class ItemImageSource:
    """Item token -> image file in one folder, found by file name (``<token>.<extension>``).

    The folder is listed once, so a catalogue of any size costs one directory scan rather
    than a file-system probe per item and extension. Extensions match case-insensitively;
    when a token has several files, the earlier extension of :data:`IMAGE_EXTENSIONS` wins.
    """

    def __init__(self, images_dir: str | os.PathLike):
        self.images_dir = Path(images_dir)
        self._paths: dict[str, Path] = {}
        if not self.images_dir.is_dir():
            logger.warning("image folder %s does not exist: every item gets the fallback vector", self.images_dir)
            return
        rank = {extension: i for i, extension in enumerate(IMAGE_EXTENSIONS)}
        with os.scandir(self.images_dir) as entries:
            for entry in entries:
                stem, extension = os.path.splitext(entry.name)
                extension = extension.lower()
                if extension not in rank or not entry.is_file():
                    continue
                known = self._paths.get(stem)
                if known is None or rank[extension] < rank[known.suffix.lower()]:
                    self._paths[stem] = Path(entry.path)

    @classmethod
    def from_config(cls, config) -> ItemImageSource:
        """The folder of config key ``image_dir``, else ``<data_path>/images``."""
        return cls(Path(config["image_dir"] or Path(config["data_path"]) / "images").expanduser())

    def path(self, token: str) -> Path | None:
        """The item's image file, or None when it has none."""
        return self._paths.get(token)

    def __len__(self) -> int:
        return len(self._paths)


@dataclass
class ItemText:
    """An item's metadata fields (empty strings when unknown) and its reviews."""

    title: str = ""
    categories: str = ""
    brand: str = ""
    description: str = ""
    keywords: str = ""  # precomputed review keywords (dataset_prep's ``keywords`` column), space-separated
    reviews: list[str] = field(default_factory=list)


def _column_name(header_field: str) -> str:
    return header_field.split(":", 1)[0].strip()


def read_item_metadata(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``<dataset>.item`` as token -> {field: text} for the :data:`METADATA_FIELDS` it has; {} if absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        columns = [_column_name(name) for name in handle.readline().rstrip("\n").split("\t")]
        if "item_id" not in columns:
            raise ValueError(f"{path}: no item_id column in the header {columns}")
        item_column = columns.index("item_id")
        wanted = [(i, name) for i, name in enumerate(columns) if name in METADATA_FIELDS]
        metadata = {}
        for line in handle:
            values = line.rstrip("\n").split("\t")
            if len(values) <= item_column or not values[item_column]:
                continue
            metadata[values[item_column]] = {name: values[i] if i < len(values) else "" for i, name in wanted}
    return metadata


def read_reviews(path: str | os.PathLike) -> dict[str, list[str]]:
    """``<dataset>.reviews`` as token -> reviews in file order; {} if absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    reviews: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            item, _, text = line.rstrip("\n").partition("\t")
            if number == 0 and _column_name(item) == "item_id":
                continue
            if item and text.strip():
                reviews.setdefault(item, []).append(text)
    return reviews


def without_reviews(texts: dict[str, ItemText], tokens: set[str]) -> dict[str, ItemText]:
    """``texts`` with the reviews (and review keywords) of ``tokens`` removed: a new item (``cold_item_share``)
    has its title and categories, but no review yet, and its prompt must not read its test users' words."""
    return {token: replace(text, reviews=[], keywords="") if token in tokens else text for token, text in texts.items()}


def read_item_texts(data_path: str | os.PathLike, dataset: str) -> dict[str, ItemText]:
    """Metadata and reviews of every item that has either, by token."""
    data_path = Path(data_path)
    metadata = read_item_metadata(data_path / f"{dataset}.item")
    reviews = read_reviews(data_path / f"{dataset}.reviews")
    texts = {}
    for token in metadata.keys() | reviews.keys():
        texts[token] = ItemText(**metadata.get(token, {}), reviews=reviews.get(token, []))
    logger.info(
        "item texts: %d items with metadata (%s), %d with reviews (%s)",
        len(metadata), data_path / f"{dataset}.item", len(reviews), data_path / f"{dataset}.reviews",
    )
    return texts
