"""Where a dataset's raw files come from (``raw_urls``), and the commands that prepare it by hand.

A dataset can be prepared from raw Amazon Reviews files (``reveal_recbole.prepare``) when

* its config has ``raw_urls: {reviews: URL, meta: URL}`` (``properties/dataset/sports.yaml``,
  ``beauty.yaml``, ``toys.yaml``, or any config file or dict: a mirror or a ``file://`` copy
  replaces the public URL this way), or
* its name is ``amazon2014-<Category>`` or ``amazon2018-<Category>``, ``<Category>`` as the
  Amazon files spell it (``amazon2014-Sports_and_Outdoors``, ``amazon2018-Industrial_and_Scientific``):
  the 2014 5-core reviews and metadata (McAuley, SNAP mirror) or the 2018 ones (Ni, McAuley).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from reveal_recbole.errors import ConfigError

AMAZON_NAME = re.compile(r"amazon(2014|2018)-([A-Za-z0-9_]+)")
AMAZON_URLS = {  # the public pages: https://jmcauley.ucsd.edu/data/amazon/ (2014), .../amazon_v2/ (2018)
    "2014": {
        "reviews": "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_{category}_5.json.gz",
        "meta": "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_{category}.json.gz",
    },
    "2018": {
        "reviews": "https://jmcauley.ucsd.edu/data/amazon_v2/categoryFilesSmall/{category}_5.json.gz",
        "meta": "https://jmcauley.ucsd.edu/data/amazon_v2/metaFiles2/meta_{category}.json.gz",
    },
}
RAW_KINDS = ("reviews", "meta")
DOWNLOAD_MODES = ("auto", "never")
COUNTS = ("users", "items", "interactions")


@dataclass(frozen=True)
class RawSource:
    """A dataset made from raw Amazon files: its name, folder (``data_path``), URLs and published 5-core counts."""

    name: str
    folder: Path
    urls: dict[str, str]
    published: dict[str, int] | None = None

    @property
    def raw_dir(self) -> Path:
        return self.folder / "raw"

    def raw_path(self, kind: str) -> Path:
        """``<folder>/raw/<the URL's file name>``."""
        return self.raw_dir / unquote(Path(urlsplit(self.urls[kind]).path).name)


def download_mode(config) -> str:
    mode = config["download"] or "auto"
    if mode not in DOWNLOAD_MODES:
        raise ConfigError(f"download must be one of {', '.join(DOWNLOAD_MODES)}, got {config['download']!r}")
    return mode


def raw_source(config) -> RawSource | None:
    """The raw source of the configured dataset (``raw_urls``, else an ``amazon<year>-<Category>`` name), or None."""
    name, urls = config["dataset"], config["raw_urls"]
    if urls is None:
        match = AMAZON_NAME.fullmatch(name)
        if match is None:
            return None
        year, category = match.groups()
        urls = {kind: template.format(category=category) for kind, template in AMAZON_URLS[year].items()}
    if not isinstance(urls, dict) or "reviews" not in urls or not set(urls) <= set(RAW_KINDS) or not all(
        isinstance(url, str) and "://" in url for url in urls.values()
    ):
        raise ConfigError(f"raw_urls must map reviews (and optionally meta) to URLs, got {urls!r}")
    published = config["published_counts"]
    if published is not None and (not isinstance(published, dict) or set(published) != set(COUNTS)):
        raise ConfigError(f"published_counts must give {', '.join(COUNTS)}, got {published!r}")
    return RawSource(name, Path(config["data_path"]), dict(urls), published)


def manual_commands(source: RawSource, modalities: list[str] | None) -> list[str]:
    """The commands that do by hand what ``download: auto`` does: fetch, convert, images, features."""
    commands = [f"curl -fL -C - --create-dirs -o {source.raw_path(kind)} {url}" for kind, url in source.urls.items()]
    meta = f" --meta {source.raw_path('meta')}" if "meta" in source.urls else ""
    commands.append(
        f"python dataset_prep/convert_amazon.py --reviews {source.raw_path('reviews')}{meta} "
        f"--out {source.folder} --name {source.name}"
    )
    if modalities:
        if "image" in modalities and meta:
            commands.append(f"python dataset_prep/download_images.py --dir {source.folder} --name {source.name} "
                            "--workers 16")
        commands.append(f"python dataset_prep/extract_features.py --dataset-dir {source.folder} --name {source.name} "
                        f"--modalities {','.join(modalities)}")
    return commands
