"""A disk cache of item features keyed by content, so extraction recomputes only what changed.

Used by FVE (prompt-conditioned image features) and by the text feature extraction.

Each FVE round rewrites the prompts of a quarter of the items at most; a feature depends only
on the image, the prompt and the encoder, so every other item's feature is read back. A key
is the SHA-256 of (SHA-256 of the image bytes, prompt, encoder id), the encoder id naming
model, revision and pooling (``ImageEncoder.name``).

Layout under ``root``: ``format.json`` (the cache format version), ``entries/ab/<key>.npy``, one
float32 vector per key, and ``image_digests.json`` (:class:`ImageDigests`: the image files' digests
by path and stat, so a round or a resumed run does not read and hash unchanged images again).
Every file is written to a temporary name and renamed, so a killed process never leaves a
half-written entry. Entries are not fsynced: a sync per entry cost 5.6 ms here, more than most
encoders take per image, and hours for a million-item round 0; an entry that an operating-system
crash cut short fails :meth:`FeatureCache.get`'s checks and is dropped as a miss. A cache of
another format version is emptied and rebuilt, never read.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from reveal_recbole.atomic import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
FORMAT_FILE = "format.json"
ENTRIES_DIR = "entries"
DIGESTS_FILE = "image_digests.json"
DIGESTS_VERSION = 1


def image_digest(image_bytes: bytes) -> str:
    """SHA-256 of the encoded image file: the same picture under another path or name hits the cache."""
    return hashlib.sha256(image_bytes).hexdigest()


def read_image_file(path: str | os.PathLike) -> tuple[bytes, tuple[int, int, int]]:
    """The file's bytes and its (size, mtime_ns, inode), the stat taken from the open file before
    reading: a write after the stat changes the stat, so a digest recorded with it is checked again."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        return handle.read(), (stat.st_size, stat.st_mtime_ns, stat.st_ino)


class ImageDigests:
    """:func:`image_digest` of image files, remembered by path and (size, mtime_ns, inode).

    An FVE round changes a quarter of the prompts at most, so the other items' features are read
    from the cache by key; the key needs the image's digest, and reading and hashing every image
    again each round costs I/O that grows with the catalogue. A digest is reused while the
    file's size, modification time and inode are those it was recorded with; any write or
    replacement of the file changes them, and the file is read and hashed again. (A rewrite of
    the same size within one tick of a coarse file-system clock is the one change this cannot
    see.) Kept in memory for the run and in ``path``, written by :meth:`save`.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, tuple[int, int, int, str]] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
                if stored["version"] == DIGESTS_VERSION:
                    self._entries = {name: tuple(entry) for name, entry in stored["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                logger.warning("ignoring unreadable image digests %s: %s", self.path, error)

    @staticmethod
    def _name(path: str | os.PathLike) -> str:
        return os.path.abspath(path)

    def digest(self, path: str | os.PathLike) -> tuple[str, bytes | None]:
        """The file's digest and, when it had to be read, its bytes (None: known from its stat).
        A missing file raises FileNotFoundError."""
        entry = self._entries.get(self._name(path))
        if entry is not None:
            stat = os.stat(path)
            if entry[:3] == (stat.st_size, stat.st_mtime_ns, stat.st_ino):
                return entry[3], None
        return self.read(path)

    def read(self, path: str | os.PathLike) -> tuple[str, bytes]:
        """Read and hash the file now, and remember its digest."""
        data, stat = read_image_file(path)
        digest = image_digest(data)
        self._entries[self._name(path)] = (*stat, digest)
        self._dirty = True
        return digest, data

    def save(self) -> None:
        """Write the digests to ``path`` (when one is set and they changed)."""
        if self.path is not None and self._dirty:
            atomic_write_text(self.path, json.dumps({"version": DIGESTS_VERSION, "entries": self._entries}) + "\n")
            self._dirty = False


class FeatureCache:
    """Feature vectors on disk by (image digest, prompt, encoder id), with hit/miss counters."""

    def __init__(self, root: str | os.PathLike, format_version: int = CACHE_FORMAT_VERSION):
        self.root = Path(root)
        self.entries = self.root / ENTRIES_DIR
        self.format_version = format_version
        self.hits = 0
        self.misses = 0
        self.digests = ImageDigests(self.root / DIGESTS_FILE)
        found = self._stored_version()
        if found != format_version:
            if found is not None or self.entries.exists():
                logger.warning(
                    "feature cache %s has format %s, expected %s: rebuilding it", self.root, found, format_version
                )
                shutil.rmtree(self.entries, ignore_errors=True)
            atomic_write_text(self.root / FORMAT_FILE, json.dumps({"format_version": format_version}) + "\n")

    def _stored_version(self) -> int | None:
        try:
            return int(json.loads((self.root / FORMAT_FILE).read_text(encoding="utf-8"))["format_version"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def key(image_sha256: str, prompt: str, encoder_id: str) -> str:
        """The entry key; JSON-encoding the triple keeps distinct triples distinct."""
        return hashlib.sha256(json.dumps([image_sha256, prompt, encoder_id]).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.entries / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The cached vector, or None (a miss); an unreadable entry is removed and counts as a miss."""
        path = self._path(key)
        try:
            vector = np.load(path, allow_pickle=False)
            if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.floating):
                raise ValueError(f"entry of shape {vector.shape} and dtype {vector.dtype}")
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, EOFError) as error:
            logger.warning("dropping unreadable feature cache entry %s: %s", path, error)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim != 1:
            raise ValueError(f"a cache entry is one vector, got shape {vector.shape}")
        buffer = io.BytesIO()
        np.save(buffer, vector, allow_pickle=False)
        atomic_write_bytes(self._path(key), buffer.getvalue(), sync=False)  # not fsynced: the module's docstring
