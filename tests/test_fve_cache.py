"""FVE feature cache: keys, hits and misses, crash-safe entries, rebuild on a format change, image digests by stat."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from reveal_recbole.data import feature_cache
from reveal_recbole.data.feature_cache import (
    CACHE_FORMAT_VERSION,
    DIGESTS_FILE,
    FeatureCache,
    ImageDigests,
    image_digest,
)


def test_keys_separate_image_prompt_and_encoder():
    digest = image_digest(b"png bytes")
    assert digest == image_digest(b"png bytes") != image_digest(b"other bytes")
    keys = {
        FeatureCache.key(digest, "a red box", "clip:tiny@1"),
        FeatureCache.key(digest, "a blue box", "clip:tiny@1"),
        FeatureCache.key(digest, "a red box", "clip:tiny@2"),
        FeatureCache.key(image_digest(b"x"), "a red box", "clip:tiny@1"),
        FeatureCache.key(digest, "a red box\", \"clip", "tiny@1"),  # no ambiguity from joining
    }
    assert len(keys) == 5


def test_hits_misses_and_persistence(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    key = FeatureCache.key(image_digest(b"img"), "prompt", "enc")
    assert cache.get(key) is None and (cache.hits, cache.misses) == (0, 1)
    cache.put(key, np.array([0.6, 0.8], dtype=np.float64))
    vector = cache.get(key)
    assert vector.dtype == np.float32 and vector.tolist() == pytest.approx([0.6, 0.8])
    assert (cache.hits, cache.misses) == (1, 1)
    reopened = FeatureCache(tmp_path / "cache")
    assert reopened.get(key) is not None and (reopened.hits, reopened.misses) == (1, 0)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    with pytest.raises(ValueError, match="one vector"):
        cache.put(key, np.zeros((2, 2)))


def test_unreadable_entry_is_a_miss_and_removed(tmp_path):
    cache = FeatureCache(tmp_path)
    key = FeatureCache.key("d", "p", "e")
    cache.put(key, np.ones(3))
    path = next((tmp_path / "entries").rglob("*.npy"))
    path.write_bytes(b"\x93NUMPY garbage")
    assert cache.get(key) is None and cache.misses == 1 and not path.exists()


def test_other_format_version_is_rebuilt_not_read(tmp_path):
    old = FeatureCache(tmp_path, format_version=CACHE_FORMAT_VERSION + 1)
    key = FeatureCache.key("d", "p", "e")
    old.put(key, np.ones(4))
    cache = FeatureCache(tmp_path)
    assert json.loads((tmp_path / "format.json").read_text()) == {"format_version": CACHE_FORMAT_VERSION}
    assert cache.get(key) is None and not list((tmp_path / "entries").rglob("*.npy"))
    cache.put(key, np.zeros(4))
    (tmp_path / "format.json").unlink()  # entries without a format file: unknown version, rebuilt too
    assert FeatureCache(tmp_path).get(key) is None


@pytest.fixture
def file_reads(monkeypatch):
    """Every image file ImageDigests reads (and so hashes), by name."""
    reads = []
    real = feature_cache.read_image_file

    def spy(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(feature_cache, "read_image_file", spy)
    return reads


def test_image_digests_reuse_a_digest_while_the_files_stat_is_unchanged(tmp_path, file_reads):
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    digests = ImageDigests(tmp_path / "digests.json")
    assert digests.digest(image) == (image_digest(b"first"), b"first")
    assert digests.digest(image) == (image_digest(b"first"), None) and file_reads == ["a.png"]  # not read again

    stat = image.stat()
    image.write_bytes(b"other")  # same size: the new mtime says it changed
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert digests.digest(image) == (image_digest(b"other"), b"other")
    image.write_bytes(b"longer bytes")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same mtime, other size
    assert digests.digest(image)[0] == image_digest(b"longer bytes") and len(file_reads) == 3

    digests.save()  # persisted: a new run reads nothing it has hashed
    assert ImageDigests(tmp_path / "digests.json").digest(image) == (image_digest(b"longer bytes"), None)
    assert len(file_reads) == 3
    with pytest.raises(FileNotFoundError):
        digests.digest(tmp_path / "absent.png")


def test_feature_cache_keeps_image_digests_beside_its_entries(tmp_path, file_reads):
    image = tmp_path / "a.png"
    image.write_bytes(b"pixels")
    cache = FeatureCache(tmp_path / "cache")
    cache.digests.digest(image)
    cache.digests.save()
    assert (tmp_path / "cache" / DIGESTS_FILE).is_file()
    assert FeatureCache(tmp_path / "cache").digests.digest(image) == (image_digest(b"pixels"), None)
    (tmp_path / "cache" / DIGESTS_FILE).write_text("{not json")  # unreadable: ignored, every file hashed again
    assert FeatureCache(tmp_path / "cache").digests.digest(image) == (image_digest(b"pixels"), b"pixels")
    assert file_reads == ["a.png", "a.png"]


def test_entries_are_renamed_into_place_without_a_sync_each(tmp_path, monkeypatch):
    """A sync per entry cost more than most encoders take per image; a failed write leaves nothing behind."""
    syncs = []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    cache = FeatureCache(tmp_path)
    syncs.clear()  # the format file is written (and synced) once, when the cache is made
    for i in range(3):
        cache.put(FeatureCache.key(str(i), "p", "e"), np.ones(2))
    assert syncs == [] and len(list((tmp_path / "entries").rglob("*.npy"))) == 3

    def full_disk(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        cache.put(FeatureCache.key("x", "p", "e"), np.ones(2))
    assert len(list((tmp_path / "entries").rglob("*.npy"))) == 3 and not list(tmp_path.rglob("*.tmp"))
