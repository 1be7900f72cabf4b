"""Feature files: matched to items by token (never by row order); every bad file fails naming itself."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reveal_recbole import Config
from reveal_recbole.data import (
    FeatureFileError,
    create_dataset,
    feature_paths,
    load_item_features,
    read_feature_file,
    write_item_features,
)

DIM = 4
TOKENS = ["a", "b", "c", "d", "e"]
TOKEN_TO_ID = {"[PAD]": 0, **{token: i + 1 for i, token in enumerate(TOKENS)}}
N_ITEMS = len(TOKEN_TO_ID)


def token_vector(token: str) -> np.ndarray:
    """A row that identifies its token, whatever position it is written at."""
    return np.full(DIM, float(sum(map(ord, token))), dtype=np.float32) + np.arange(DIM, dtype=np.float32)


def write_pair(folder: Path, tokens, values, modality="image", name="toy") -> tuple[Path, Path]:
    npy_path, items_path = feature_paths(folder, name, modality)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(npy_path, values)
    items_path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return npy_path, items_path


def load(folder: Path, strict=True):
    return load_item_features(folder, "toy", ["image"], TOKEN_TO_ID, N_ITEMS, strict=strict)["image"]


def test_rows_follow_tokens_not_positions(tmp_path):
    shuffled = ["d", "a", "e", "c", "b"]
    write_pair(tmp_path, shuffled, np.stack([token_vector(t) for t in shuffled]))
    features = load(tmp_path)
    assert features.values.shape == (N_ITEMS, DIM) and features.values.dtype == torch.float32
    for token, item_id in TOKEN_TO_ID.items():
        if item_id == 0:
            assert not features.present[0] and torch.count_nonzero(features.values[0]) == 0
        else:
            assert features.present[item_id]
            assert torch.equal(features.values[item_id], torch.from_numpy(token_vector(token)))


def test_superset_with_strict_false_ignores_extra_rows_with_a_warning(tmp_path, caplog):
    tokens = ["zz", "c", "a", "yy", "b"]  # extra tokens; d and e have no row
    write_pair(tmp_path, tokens, np.stack([token_vector(t) for t in tokens]))
    with caplog.at_level(logging.WARNING, logger="reveal_recbole.data.features"):
        features = load(tmp_path, strict=False)
    assert any("ignored 2 rows" in r.getMessage() for r in caplog.records)
    for token in ("a", "b", "c"):
        assert torch.equal(features.values[TOKEN_TO_ID[token]], torch.from_numpy(token_vector(token)))
    for token in ("d", "e"):
        assert not features.present[TOKEN_TO_ID[token]]
        assert torch.count_nonzero(features.values[TOKEN_TO_ID[token]]) == 0


def test_unknown_tokens_with_strict_true_fail(tmp_path):
    tokens = ["a", "b", "zz"]
    npy_path, _ = write_pair(tmp_path, tokens, np.stack([token_vector(t) for t in tokens]))
    with pytest.raises(FeatureFileError) as excinfo:
        load(tmp_path, strict=True)
    assert str(npy_path) in str(excinfo.value) and "zz" in str(excinfo.value)
    assert "strict_feature_items" in str(excinfo.value)


def test_write_item_features_round_trips(tmp_path):
    values = np.random.default_rng(0).normal(size=(3, DIM))
    npy_path, items_path = write_item_features(tmp_path, "toy", "image", ["c", "a", "b"], values)
    tokens, array = read_feature_file(npy_path, items_path)
    assert tokens == ["c", "a", "b"] and array.dtype == np.float32
    np.testing.assert_allclose(array, values.astype(np.float32))
    with pytest.raises(ValueError):
        write_item_features(tmp_path, "toy", "image", ["a"], values)


def _bad(values, tokens=None):
    """A writer for one broken pair: the array as given, ``tokens`` (default: one per row)."""
    def write(folder):
        rows = values.shape[0] if values.ndim else 0
        return write_pair(folder, TOKENS[:rows] if tokens is None else tokens, values)
    return write


def _good():
    return np.stack([token_vector(t) for t in TOKENS[:3]])


def _with(value):
    array = _good()
    array[1, 2] = value
    return array


BAD_FILES = {
    "1-D": (_bad(np.ones(3, dtype=np.float32)), "2-D"),
    "3-D": (_bad(np.ones((3, 2, 2), dtype=np.float32)), "2-D"),
    "0 rows": (_bad(np.ones((0, DIM), dtype=np.float32)), "empty"),
    "0 columns": (_bad(np.ones((3, 0), dtype=np.float32)), "empty"),
    "int dtype": (_bad(np.ones((3, DIM), dtype=np.int64)), "floating-point"),
    "NaN": (_bad(_with(np.nan)), "'b'"),
    "inf": (_bad(_with(np.inf)), "'b'"),
    "duplicate tokens": (_bad(_good(), ["a", "b", "a"]), "duplicate"),
    "more tokens than rows": (_bad(_good(), ["a", "b", "c", "d"]), "4 item tokens"),
    "fewer tokens than rows": (_bad(_good(), ["a", "b"]), "2 item tokens"),
    "no overlap": (_bad(_good(), ["x", "y", "z"]), "none of its"),
    "unknown tokens": (_bad(_good(), ["a", "b", "zz"]), "not items of the dataset"),
}


@pytest.mark.parametrize(
    "case, strict",
    [
        pytest.param(case, strict, id=f"{case}-{'strict' if strict else 'lenient'}")
        for case in BAD_FILES
        for strict in (True, False)
        if not (case == "unknown tokens" and not strict)  # lenient: ignored with a warning (tested above)
    ],
)
def test_bad_feature_files_name_the_file(tmp_path, case, strict):
    write, expected = BAD_FILES[case]
    npy_path, items_path = write(tmp_path)
    with pytest.raises(FeatureFileError) as excinfo:
        load(tmp_path, strict=strict)
    message = str(excinfo.value)
    assert str(npy_path) in message or str(items_path) in message, message
    assert expected in message


@pytest.mark.parametrize(
    "content", [b"this is not a numpy file", b"", b"\x93NUMPY\x01\x00"], ids=["text", "zero bytes", "cut header"]
)
def test_corrupt_npy_names_the_file(tmp_path, content):
    npy_path, items_path = write_pair(tmp_path, TOKENS[:3], _good())
    npy_path.write_bytes(content)
    with pytest.raises(FeatureFileError, match="not a readable .npy") as excinfo:
        read_feature_file(npy_path, items_path)
    assert str(npy_path) in str(excinfo.value)


def test_truncated_npy_names_the_file(tmp_path):
    npy_path, items_path = write_pair(tmp_path, TOKENS[:3], _good())
    npy_path.write_bytes(npy_path.read_bytes()[:-7])
    with pytest.raises(FeatureFileError) as excinfo:
        read_feature_file(npy_path, items_path)
    assert str(npy_path) in str(excinfo.value)


def test_non_utf8_item_tokens_name_the_file(tmp_path):
    npy_path, items_path = write_pair(tmp_path, TOKENS[:3], _good())
    items_path.write_bytes(b"A\nB\n\xff\xfe\n")
    with pytest.raises(FeatureFileError, match="not UTF-8") as excinfo:
        read_feature_file(npy_path, items_path)
    assert str(items_path) in str(excinfo.value)


@pytest.mark.parametrize("which", [0, 1], ids=[".npy", ".items"])
def test_missing_file_names_it(tmp_path, which):
    paths = write_pair(tmp_path, TOKENS[:3], _good())
    paths[which].unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        load(tmp_path)
    assert str(paths[which]) in str(excinfo.value)


# ------------------------------------------------------------------ through the dataset
def dataset_config(tiny_config, **overrides):
    return Config(model="SASRecREVEAL", dataset="scientific", config_dict={**tiny_config, **overrides})


def test_dataset_aligns_shuffled_superset_features_by_token(tiny_config, tiny_data):
    folder = tiny_data / "scientific"
    npy_path, items_path = feature_paths(folder, "scientific", "image")
    tokens = items_path.read_text(encoding="utf-8").splitlines()
    values = np.load(npy_path)
    order = np.random.default_rng(0).permutation(len(tokens))
    extra = ["NOT_AN_ITEM_1", "NOT_AN_ITEM_2"]
    shuffled_tokens = [tokens[i] for i in order] + extra
    shuffled_values = np.concatenate([values[order], np.ones((len(extra), values.shape[1]), np.float32)])
    write_item_features(folder, "scientific", "image", shuffled_tokens, shuffled_values)

    with pytest.raises(FeatureFileError, match="NOT_AN_ITEM"):
        create_dataset(dataset_config(tiny_config))
    dataset = create_dataset(dataset_config(tiny_config, strict_feature_items=False))
    features = dataset.item_features["image"]
    row_of = {token: i for i, token in enumerate(tokens)}
    id2token = dataset.field2id_token[dataset.iid_field]
    assert features.values.shape == (dataset.item_num, values.shape[1])
    assert not features.present[0]
    for item_id in range(1, dataset.item_num):
        assert features.present[item_id]
        row = torch.from_numpy(values[row_of[id2token[item_id]]])
        torch.testing.assert_close(features.values[item_id], F.normalize(row, dim=0))  # feature_norm: l2 at load
    assert features.unit_norm
    raw = create_dataset(dataset_config(tiny_config, strict_feature_items=False, feature_norm="none"))
    raw_features = raw.item_features["image"]
    assert not raw_features.unit_norm
    for item_id in range(1, raw.item_num):
        assert torch.equal(raw_features.values[item_id], torch.from_numpy(values[row_of[id2token[item_id]]]))
    text = dataset.item_features["text"]
    assert bool(text.present[1:].all())


def test_dataset_reports_a_bad_feature_file(tiny_config, tiny_data):
    npy_path, items_path = feature_paths(tiny_data / "scientific", "scientific", "text")
    values = np.load(npy_path)
    values[5, 0] = np.nan
    np.save(npy_path, values)
    bad_token = items_path.read_text(encoding="utf-8").splitlines()[5]
    with pytest.raises(FeatureFileError) as excinfo:
        create_dataset(dataset_config(tiny_config))
    assert str(npy_path) in str(excinfo.value) and bad_token in str(excinfo.value)
