"""FVE feature cache: keys, hits and misses, crash-safe entries, rebuild on a format change."""
import json

import numpy as np
import pytest

from reveal_recbole.data.feature_cache import CACHE_FORMAT_VERSION, FeatureCache, image_digest


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
