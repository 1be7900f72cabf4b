"""dataset_prep/make_synthetic.py: deterministic, real PNG images, features from pixels, a real visual signal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_prep import make_synthetic
from dataset_prep.common import read_inter
from reveal_recbole.data.features import feature_paths, read_feature_file

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["--users", "60", "--items", "48", "--image-size", "32", "--max-len", "8"]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    make_synthetic.main(SMALL + ["--out", str(tmp_path / "a")])
    make_synthetic.main(SMALL + ["--out", str(tmp_path / "b")])
    make_synthetic.main(SMALL + ["--out", str(tmp_path / "c"), "--seed", "1"])
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a["synthetic.inter"] != c["synthetic.inter"]
    assert a["synthetic.image.npy"] != c["synthetic.image.npy"]
    shared = set(a) & set(c) - {"synthetic.inter", "synthetic.image.npy"}
    assert any(a[name] != c[name] for name in shared if name.startswith("images/"))


def test_outputs_are_consistent_and_features_come_from_the_pngs(tmp_path):
    out = tmp_path / "syn"
    result = make_synthetic.main(SMALL + ["--out", str(out), "--name", "syn"])
    inter = read_inter(out / "syn.inter")
    assert len(inter) == 60 == result["users"]
    assert all(5 <= len(events) <= 8 for events in inter.values())
    assert all([t for _, t in events] == list(range(len(events))) for events in inter.values())
    assert all(len({i for i, _ in events}) == len(events) for events in inter.values())  # no repeats
    items = sorted({i for events in inter.values() for i, _ in events})
    assert len(items) == result["items"]

    item_rows = [line.split("\t") for line in (out / "syn.item").read_text().splitlines()]
    assert item_rows[0][0] == "item_id:token" and sorted(r[0] for r in item_rows[1:]) == items
    truth = {r.split("\t")[0]: r.split("\t")[1:] for r in (out / "syn.truth.tsv").read_text().splitlines()[1:]}
    for row in item_rows[1:]:
        assert row[1] == truth[row[0]][3] and row[2] == f"synthetic > {row[1]}"  # text: category only

    image_tokens, image = read_feature_file(*feature_paths(out, "syn", "image"))
    text_tokens, text = read_feature_file(*feature_paths(out, "syn", "text"))
    assert sorted(image_tokens) == items == sorted(text_tokens)
    assert np.allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    for token, row in zip(image_tokens, np.asarray(image)):
        with Image.open(out / "images" / f"{token}.png") as png:
            assert png.format == "PNG" and png.size == (32, 32) and png.mode == "RGB"
            assert np.array_equal(make_synthetic.image_descriptor(png), row)
    by_category = {}
    for token, row in zip(text_tokens, np.asarray(text)):
        by_category.setdefault(truth[token][3], set()).add(row.tobytes())
    assert all(len(rows) == 1 for rows in by_category.values()) and len(by_category) > 1
    urls = (out / "syn.images.tsv").read_text().splitlines()
    assert urls[0] == "item_id\timage_urls" and urls[1].split("\t")[1] == f"images/{urls[1].split()[0]}.png"


def test_descriptor_reads_pixels_not_labels():
    rng = np.random.default_rng(0)
    red = make_synthetic.draw_item((210, 40, 40), "circle", "plain", 64, rng, 0.0)
    blue = make_synthetic.draw_item((40, 80, 210), "circle", "plain", 64, rng, 0.0)
    d_red, d_blue = make_synthetic.image_descriptor(red), make_synthetic.image_descriptor(blue)
    assert d_red.shape == (176,) and d_red.dtype == np.float32
    assert float(d_red @ d_blue) < 0.99
    flipped = make_synthetic.image_descriptor(red.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert float(flipped @ d_red) > 0.9  # same object, mirrored: nearly the same description
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    assert np.isfinite(make_synthetic.image_descriptor(gray)).all()


def history_ndcg(features: np.ndarray, sequences: list[list[int]]) -> float:
    """NDCG@10 of the last item when all unseen items are ranked by similarity to the mean history."""
    centred = features - features.mean(0)
    total = 0.0
    for seq in sequences:
        history, target = seq[:-1], seq[-1]
        scores = centred @ centred[history].mean(0)
        scores[history] = -np.inf
        above, tied = (scores > scores[target]).sum(), (scores == scores[target]).sum()
        ranks = np.arange(above, above + tied)  # random tie-breaking, in expectation
        total += np.where(ranks < 10, 1.0 / np.log2(ranks + 2), 0.0).mean()
    return total / len(sequences)


def test_the_images_carry_the_preference_and_the_text_does_not(tmp_path):
    """Model-free check: ranking items by descriptor similarity to the history finds the target."""
    out = tmp_path / "syn"
    make_synthetic.main(["--users", "300", "--out", str(out)])
    image_tokens, image = read_feature_file(*feature_paths(out, "synthetic", "image"))
    _, text = read_feature_file(*feature_paths(out, "synthetic", "text"))
    index = {t: i for i, t in enumerate(image_tokens)}
    sequences = [[index[i] for i, _ in events] for events in read_inter(out / "synthetic.inter").values()]
    image_ndcg = history_ndcg(np.asarray(image, dtype=np.float64), sequences)
    text_ndcg = history_ndcg(np.asarray(text, dtype=np.float64), sequences)
    chance = 10 / len(image_tokens)
    assert image_ndcg > 3 * chance and image_ndcg > 3 * text_ndcg, (image_ndcg, text_ndcg)


# Measured (2 shared CPU cores, torch 2.13): test NDCG@10 of the tiny SASRecREVEAL below on the
# default synthetic set, model seeds 2020 / 2021 / 2022: image .0859 / .0914 / .0907, text
# .0659 / .0623 / .0688, so image leads by .020 / .029 / .022 (valid NDCG@10: by .020 / .017 /
# .019). Seed 2020 is deterministic here (the same numbers with 1 or 2 threads). The assertion
# asks for about a third of the smallest measured margin.
TINY_SASREC = {
    "hidden_size": 32, "inner_size": 64, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 20,
    "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "learning_rate": 0.003,
    "epochs": 20, "stopping_step": 5, "train_batch_size": 256, "eval_batch_size": 4096,
    "feature_trainable": False, "feature_dropout": 0.0, "fusion": "sum", "feature_norm": "l2",
    "avl": False, "visual_utilisation": False, "diagnostics_figure": False, "fve_rounds": 0,
    "seed": 2020, "reproducibility": True, "state": "WARNING", "show_progress": False,
    "save_dataset": False, "save_dataloaders": False,
}
MARGIN = 0.007


@pytest.fixture
def one_torch_thread():
    """One thread: as fast on 2 busy cores as two (often faster), and the same numbers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sasrec_reveal_learns_more_from_the_images_than_from_the_text(tmp_path, monkeypatch, one_torch_thread):
    from reveal_recbole.quick_start import run_reveal

    monkeypatch.chdir(tmp_path)  # RecBole writes ./log and ./log_tensorboard
    make_synthetic.main(["--out", str(tmp_path / "data" / "synthetic")])
    ndcg = {}
    for modality in ("image", "text"):
        config = dict(TINY_SASREC, data_path=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "saved"))
        config["modalities"] = [modality]
        result = run_reveal(model="SASRecREVEAL", dataset="synthetic", config_dict=config, saved=True)
        ndcg[modality] = float(result["test_result"]["ndcg@10"])
    assert ndcg["image"] > ndcg["text"] + MARGIN, ndcg


# ---- the cluttered world (issue 12) -------------------------------------------------------------

CLUTTER = SMALL + ["--distractors", "2", "--reviews", "0.8", "--image-size", "64"]


def rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


def saturated_hues(pixels: np.ndarray) -> np.ndarray:
    """Hues (degrees) of the clearly coloured pixels of an RGB array (backgrounds are pale, objects saturated)."""
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float64)
    return hsv[..., 0][hsv[..., 1] > 0.45 * 255] / 255 * 360


def hue_gap(a: np.ndarray, b: float) -> np.ndarray:
    return np.abs((a - b + 180) % 360 - 180)


def test_defaults_unchanged_by_the_clutter_flags(tmp_path):
    make_synthetic.main(SMALL + ["--out", str(tmp_path / "a")])
    make_synthetic.main(SMALL + ["--out", str(tmp_path / "b"), "--distractors", "0", "--reviews", "0"])
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert not any(name.endswith((".reviews", ".regions.tsv")) for name in files(tmp_path / "a"))
    token, hue, shape, texture, _ = rows(tmp_path / "a" / "synthetic.truth.tsv")[0]
    rng = np.random.default_rng([0, 1, int(token[4:])])  # the default image is still one drawn object
    expected = make_synthetic.draw_item(make_synthetic.hue_colour(float(hue), rng), shape, texture, 32, rng, 8.0)
    with Image.open(tmp_path / "a" / "images" / f"{token}.png") as stored:
        drawn = np.asarray(stored)
    assert np.abs(drawn.astype(int) - np.asarray(expected).astype(int)).max() <= 1  # the truth file rounds the hue


def test_clutter_world_is_deterministic_and_its_regions_hold_the_item(tmp_path):
    make_synthetic.main(CLUTTER + ["--out", str(tmp_path / "a")])
    make_synthetic.main(CLUTTER + ["--out", str(tmp_path / "b")])
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b")
    truth = {r[0]: (float(r[1]), r[2]) for r in rows(tmp_path / "a" / "synthetic.truth.tsv")}
    regions = rows(tmp_path / "a" / "synthetic.regions.tsv")
    assert sorted(r[0] for r in regions) == sorted(truth)
    for token, x0, y0, x1, y1, width, height, distractors in regions:
        x0, y0, x1, y1 = (int(v) for v in (x0, y0, x1, y1))
        assert (x1 - x0, y1 - y0, width, height) == (32, 32, "64", "64") and x0 in (0, 32) and y0 in (0, 32)
        named = distractors.split(";")
        assert len(named) == 2 and all(d.split()[1] != truth[token][1] for d in named)  # other shapes
        with Image.open(tmp_path / "a" / "images" / f"{token}.png") as png:
            pixels = np.asarray(png)
        inside = saturated_hues(pixels[y0:y1, x0:x1])
        assert np.median(hue_gap(inside, truth[token][0])) < 15  # the item's own object is in its region
        cells = [pixels[y:y + 32, x:x + 32] for y in (0, 32) for x in (0, 32) if (x, y) != (x0, y0)]
        others = [hue_gap(saturated_hues(cell), truth[token][0]) for cell in cells]
        coloured = [gap for gap in others if gap.size > 100]
        assert len(coloured) == 2 and all(np.median(gap) > 30 for gap in coloured)  # two distractors, other hues


def test_reviews_come_from_training_interactions_only_and_name_the_cues(tmp_path):
    out = tmp_path / "syn"
    make_synthetic.main(SMALL + ["--out", str(out), "--distractors", "1", "--reviews", "1.0"])
    training = sorted(item for events in read_inter(out / "synthetic.inter").values() for item, _ in events[:-2])
    reviews = rows(out / "synthetic.reviews")
    assert sorted(item for item, _ in reviews) == training  # every training interaction, nothing else
    truth = {r[0]: (float(r[1]), r[2]) for r in rows(out / "synthetic.truth.tsv")}
    distractor = {r[0]: r[7] for r in rows(out / "synthetic.regions.tsv")}
    kinds = {"cue": 0, "distractor": 0, "filler": 0}
    for item, text in reviews:
        cue = f"{make_synthetic.colour_name(truth[item][0])} {truth[item][1]}"
        kind = "cue" if cue in text else "distractor" if distractor[item] in text else "filler"
        assert kind != "filler" or text in make_synthetic.FILLER_REVIEWS
        kinds[kind] += 1
    assert all(kinds.values()), kinds  # some name the item, some a distractor, some nothing
    assert kinds["cue"] > kinds["distractor"] and kinds["cue"] > kinds["filler"]

    make_synthetic.main(SMALL + ["--out", str(out), "--review-filler", "0", "--review-distractor", "0",
                                 "--reviews", "0.5"])
    assert not (out / "synthetic.regions.tsv").exists()  # a stale file of the earlier flags is removed
    assert all(f"{make_synthetic.colour_name(truth[i][0])} {truth[i][1]}" in text
               for i, text in rows(out / "synthetic.reviews"))
    item_text = (out / "synthetic.item").read_text()
    assert not any(word in item_text for word in make_synthetic.SHAPES + ("red", "blue", "green"))
