"""Region attention mass: the share of a prompt-conditioned encoder's patch weight on the item's own region."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from reveal_recbole.fve.attention import (
    RegionAttention,
    attention_summary,
    read_item_regions,
    region_attention_mass,
    region_patches,
    uniform_mass,
)

from test_fve_aligned import tiny_encoder


def test_region_patches_are_the_grid_cells_the_box_overlaps():
    top_left = region_patches((0.0, 0.0, 0.5, 0.5), 4).reshape(2, 2)
    assert top_left.tolist() == [[True, False], [False, False]]
    grid = region_patches((0.0, 0.0, 0.5, 0.5), 49).reshape(7, 7)  # the half boundary cuts row / column 3
    assert grid[:4, :4].all() and grid.sum() == 16
    assert region_patches((3 / 7, 0.0, 4 / 7, 1 / 7), 49).sum() == 1  # exact cell edges: no overlap beyond
    with pytest.raises(ValueError, match="square grid"):
        region_patches((0, 0, 1, 1), 10)


def test_mass_on_a_constructed_case():
    weights = np.zeros((3, 4))
    weights[0] = [1, 0, 0, 0]  # all on the top-left patch
    weights[1] = [1, 1, 1, 1]  # uniform (not normalised: the share is what counts)
    weights[2] = [0.1, 0.2, 0.3, 0.4]
    boxes = [(0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5), (0.5, 0, 1, 1)]  # top-left; top-left; the right column
    assert np.allclose(region_attention_mass(weights, boxes), [1.0, 0.25, 0.2 + 0.4])
    assert uniform_mass(boxes, 4) == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    with pytest.raises(ValueError, match="3 weight rows but 2 boxes"):
        region_attention_mass(weights, boxes[:2])


def test_read_item_regions(tmp_path):
    path = tmp_path / "w.regions.tsv"
    path.write_text("item_id\tx0\ty0\tx1\ty1\twidth\theight\tdistractors\na\t32\t0\t64\t32\t64\t64\tred star\n")
    assert read_item_regions(path) == {"a": (0.5, 0.0, 1.0, 0.5)}
    assert read_item_regions(tmp_path / "none.tsv") == {}
    path.write_text("item_id\tx0\ty0\tx1\ty1\twidth\theight\na\t32\t0\t80\t32\t64\t64\n")
    with pytest.raises(ValueError, match="line 2: the box"):
        read_item_regions(path)


def test_attention_summary_reads_changed_items_before_and_after():
    before, after = {"a": 0.2, "b": 0.4, "c": 0.5}, {"a": 0.9, "b": 0.4, "c": 0.5}
    summary = attention_summary(before, after, ["a", "missing"], uniform=0.33)
    assert summary == {"mean": pytest.approx(0.6), "changed": 0.9, "changed_before": 0.2, "changed_items": 1,
                       "uniform": 0.33}
    assert attention_summary(before, after, [], 0.33)["changed"] is None


def test_region_attention_of_the_aligned_encoder_matches_its_patch_weights(tmp_path):
    encoder = tiny_encoder()
    rng = np.random.default_rng(0)
    paths = {}
    for token in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{token}.png")
        paths[token] = tmp_path / f"{token}.png"
    regions = {"a": (0, 0, 0.5, 0.5), "b": (0.5, 0.5, 1, 1), "c": (0, 0.5, 0.5, 1), "no image": (0, 0, 1, 1)}
    attention = RegionAttention(encoder, regions, {**paths, "no image": None}, batch_size=2)
    assert attention.tokens == ["a", "b", "c"]
    prompts = {"a": "a red star", "b": "a blue dotted circle", "c": "green"}
    mass = attention.mass(prompts)
    images = [Image.open(paths[t]) for t in ("a", "b", "c")]
    weights = encoder.patch_weights(images, [prompts[t] for t in ("a", "b", "c")])  # the full, unshared path
    expected = region_attention_mass(weights, [regions[t] for t in ("a", "b", "c")])
    assert np.allclose([mass[t] for t in ("a", "b", "c")], expected, atol=1e-6)
    assert mass != attention.mass({**prompts, "a": "something else entirely"})  # the prompt moves it
    assert math.isclose(attention.uniform(), 0.25)  # the tiny backbone's 4 x 4 grid, quarter boxes
    with torch.no_grad():
        assert attention.mass(prompts) == mass  # embedded once, same numbers again
