"""FVE step 2: prompt-conditioned encoders (tiny random CLIP and Qwen2.5-VL), their batches and dtypes, and
cached extraction that reads only the images of cache misses."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from reveal_recbole.data.feature_cache import FeatureCache
from reveal_recbole.data.features import read_feature_file, write_item_features
from reveal_recbole.fve.extract import (
    CLIPPromptEncoder,
    ImageEncoder,
    ItemImage,
    VLMPromptEncoder,
    dtype_tag,
    extract_item_features,
    mean_over_image_tokens,
    missing_image_vector,
    resolve_extract_dtype,
    text_guided_pooling,
)

PROMPTS = ["An item image of a glue. Focus on the red nozzle.", "An item image of a mug. Focus on the handle."]


def image(seed, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def png_bytes(seed, size=(32, 32)):
    buffer = io.BytesIO()
    image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def bpe_tokenizer(specials=()):
    """A byte-level BPE tokenizer trained here on the test prompts (no download); it ends texts with <eos>
    as CLIP's does, since CLIP's text embedding is read at the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(PROMPTS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


# ---- pooling functions --------------------------------------------------------------------

def test_text_guided_pooling_weights_patches_by_similarity_to_the_prompt():
    patches = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]])
    focused = text_guided_pooling(patches, torch.tensor([[0.0, 1.0, 0.0]]), scale=100.0)
    assert focused[0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    uniform = text_guided_pooling(patches, torch.tensor([[0.0, 1.0, 0.0]]), scale=0.0)
    assert uniform[0].tolist() == pytest.approx((torch.tensor([1.0, 2.0, 3.0]) / 14**0.5).tolist())


def test_mean_over_image_tokens_with_different_counts_per_row():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    input_ids = torch.tensor([[5, 9, 9, 0], [9, 5, 5, 5]])
    pooled = mean_over_image_tokens(hidden, input_ids, image_token_id=9)
    expected = torch.stack([hidden[0, 1:3].mean(0), hidden[1, 0]])
    assert torch.allclose(pooled, torch.nn.functional.normalize(expected, dim=-1))
    with pytest.raises(ValueError, match=r"no image tokens \(id 9\) in rows \[1\]"):
        mean_over_image_tokens(hidden, torch.tensor([[9, 0, 0, 0], [1, 1, 1, 1]]), 9)


# ---- CLIP -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config), processor, tokenizer


def test_clip_prompt_encoder(tiny_clip):
    model, processor, tokenizer = tiny_clip
    encoder = CLIPPromptEncoder(model, processor, tokenizer, name="tiny-clip")
    assert encoder.dim == 8 and encoder.name == "clip-text-guided-patches-v1:tiny-clip"
    images = [image(0), image(0), image(1, (40, 24))]
    features = encoder.encode(images, [PROMPTS[0], PROMPTS[1], PROMPTS[0] * 5])  # the last is truncated
    assert features.shape == (3, 8) and features.dtype == np.float32
    assert np.linalg.norm(features, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert not np.allclose(features[0], features[1])  # same image, other prompt: other feature
    assert np.allclose(encoder.encode(images[:1], PROMPTS[:1]), features[:1], atol=1e-6)  # batch-independent


def test_clip_prompt_encoder_from_a_local_path(tiny_clip, tmp_path):
    model, processor, tokenizer = tiny_clip
    for part in (model, processor, tokenizer):
        part.save_pretrained(tmp_path)
    encoder = CLIPPromptEncoder.from_pretrained(str(tmp_path))
    assert encoder.name == f"clip-text-guided-patches-v1:{tmp_path}@default"
    reference = CLIPPromptEncoder(model, processor, tokenizer, name="x").encode([image(2)], PROMPTS[:1])
    assert np.allclose(encoder.encode([image(2)], PROMPTS[:1]), reference, atol=1e-5)


# ---- Qwen2.5-VL -----------------------------------------------------------------------------

class QwenLikeProcessor:
    """The Qwen2.5-VL processor's interface (chat template, one <|image_pad|> per merged patch).

    transformers' own Qwen2_5_VLProcessor also needs a video processor, which needs torchvision
    (not installed here); the image processor and the token expansion below are the real logic.
    """

    image_token = "<|image_pad|>"
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}")

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def apply_chat_template(self, messages, tokenize=False):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=tokenize)

    def __call__(self, text, images, padding=True, return_tensors="pt"):
        image_inputs = self.image_processor(images=images, return_tensors=return_tensors)
        counts = (image_inputs["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        text = [t.replace(self.image_token, self.image_token * n) for t, n in zip(text, counts)]
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        encoded.update(image_inputs)
        return encoded


def tiny_qwen2_5_vl(extra_specials=(), max_position_embeddings=256):
    """A random 1-layer Qwen2.5-VL built from a config (no download), its image processor, tokenizer and
    the ids of the vision special tokens (plus ``extra_specials``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    specials = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", *extra_specials]
    tokenizer = bpe_tokenizer(specials)
    ids = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials)))
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=max_position_embeddings,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                            min_pixels=16 * 16, max_pixels=32 * 32)
    return Qwen2_5_VLForConditionalGeneration(config), image_processor, tokenizer, ids


@pytest.fixture(scope="module")
def tiny_qwen():
    model, image_processor, tokenizer, _ = tiny_qwen2_5_vl()
    return model, QwenLikeProcessor(image_processor, tokenizer)


def test_vlm_prompt_encoder_with_a_tiny_qwen2_5_vl(tiny_qwen):
    model, processor = tiny_qwen
    encoder = VLMPromptEncoder(model, processor, name="tiny-qwen")
    assert encoder.dim == 32 and encoder.name == "vlm-mean-image-tokens-v1:tiny-qwen"
    assert [part["type"] for part in encoder.messages("p")[0]["content"]] == ["text", "image"]  # prompt first
    images = [image(0), image(0), image(1, (20, 28))]  # different sizes: different image-token counts
    features = encoder.encode(images, [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert features.shape == (3, 32)
    assert np.linalg.norm(features, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert not np.allclose(features[0], features[1])  # the prompt changes the image tokens' states


def test_vlm_4bit_needs_bitsandbytes(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="bitsandbytes"):
        VLMPromptEncoder.from_pretrained("/nonexistent/model", load_in_4bit=True)


# ---- extraction with the cache --------------------------------------------------------------

class CountingEncoder(ImageEncoder):
    """Feature = normalised (mean pixel, prompt length, 1, 1); records every encode call."""

    name, dim = "counting-v1", 4

    def __init__(self):
        self.calls = []

    def encode(self, images, prompts):
        self.calls.append(list(prompts))
        rows = [[np.asarray(i, dtype=float).mean(), len(p), 1.0, 1.0] for i, p in zip(images, prompts)]
        rows = np.asarray(rows)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_missing_image_vector_is_fixed_per_token():
    first, again = missing_image_vector("B001", 16), missing_image_vector("B001", 16)
    other = missing_image_vector("B002", 16)
    assert np.array_equal(first, again) and not np.allclose(first, other)
    assert np.linalg.norm(first) == pytest.approx(1.0) and first.dtype == np.float32


def test_extract_item_features_computes_only_cache_misses(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(0))
    (tmp_path / "a_copy.png").write_bytes(png_bytes(0))
    items = [
        ItemImage("A", "prompt a", tmp_path / "a.png"),
        ItemImage("B", "prompt b", png_bytes(1)),
        ItemImage("C", "prompt c", None),
        ItemImage("D", "prompt d", tmp_path / "absent.png"),
        ItemImage("E", "prompt e", b"not an image"),
        ItemImage("F", "prompt f", str(tmp_path / "a_copy.png")),
    ]
    cache, encoder = FeatureCache(tmp_path / "cache"), CountingEncoder()
    features = extract_item_features(items, encoder, cache, batch_size=2, show_progress=False)
    assert encoder.calls == [["prompt a", "prompt b"], ["prompt f"]]  # E fails to decode in the second batch
    assert (cache.hits, cache.misses) == (0, 4)
    for row, token in [(2, "C"), (3, "D"), (4, "E")]:
        assert np.array_equal(features[row], missing_image_vector(token, 4))
    assert np.linalg.norm(features, axis=1) == pytest.approx(np.ones(6))

    encoder.calls.clear()
    again = extract_item_features(items, encoder, FeatureCache(tmp_path / "cache"), show_progress=False)
    assert encoder.calls == [] and np.array_equal(again, features)

    changed = list(items)
    changed[1] = ItemImage("B", "a rewritten prompt", png_bytes(1))
    changed[5] = ItemImage("F", "prompt a", tmp_path / "a_copy.png")  # same bytes and prompt as A: a hit
    cache = FeatureCache(tmp_path / "cache")
    updated = extract_item_features(changed, encoder, cache, show_progress=False)
    assert encoder.calls == [["a rewritten prompt"]] and (cache.hits, cache.misses) == (2, 2)  # E: a miss again
    assert np.array_equal(updated[5], features[0]) and not np.array_equal(updated[1], features[1])

    assert np.array_equal(extract_item_features(items, CountingEncoder(), None, show_progress=False), features)
    with pytest.raises(ValueError, match="batch_size"):
        extract_item_features(items, encoder, batch_size=0)


def test_extract_with_tiny_clip_writes_a_feature_file(tiny_clip, tmp_path):
    model, processor, tokenizer = tiny_clip
    encoder = CLIPPromptEncoder(model, processor, tokenizer, name="tiny-clip")
    items = [ItemImage("B00A", PROMPTS[0], png_bytes(3)), ItemImage("B00B", PROMPTS[1], None)]
    features = extract_item_features(items, encoder, FeatureCache(tmp_path / "cache"), show_progress=False)
    write_item_features(tmp_path, "tiny", "image", [i.token for i in items], features)
    tokens, array = read_feature_file(tmp_path / "tiny.image.npy", tmp_path / "tiny.image.items")
    assert tokens == ["B00A", "B00B"] and np.allclose(array, features)


class PreparingEncoder(CountingEncoder):
    """CountingEncoder whose ``prepare`` (run in the decode threads) halves the image; records
    how many images had been prepared when each batch reached ``encode``."""

    def __init__(self):
        super().__init__()
        self.prepared, self.prepared_at_encode = 0, []

    def prepare(self, image):
        self.prepared += 1
        return image.resize((image.width // 2, image.height // 2), Image.BILINEAR)

    def encode(self, images, prompts):
        self.prepared_at_encode.append(self.prepared)
        assert all(image.size == (16, 16) for image in images)  # prepared before encode
        return super().encode(images, prompts)


def threaded_items(tmp_path):
    (tmp_path / "dup.png").write_bytes(png_bytes(7))
    items = []
    for i in range(23):
        if i % 7 == 3:
            items.append(ItemImage(f"T{i}", f"p{i}", b"not an image"))
        elif i % 7 == 5:
            items.append(ItemImage(f"T{i}", f"p{i}", None if i < 12 else tmp_path / "absent.png"))
        elif i in (6, 13):  # same bytes and prompt twice in one call: both miss, both are encoded
            items.append(ItemImage(f"T{i}", "same", tmp_path / "dup.png"))
        else:
            items.append(ItemImage(f"T{i}", f"p{i}", png_bytes(i)))
    return items


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_threaded_decoding_matches_sequential(tmp_path, workers, batch_size):
    items = threaded_items(tmp_path)
    warm = [item for i, item in enumerate(items) if i % 4 == 0]  # some hits in the second run
    results = {}
    for mode in (0, workers):
        root = tmp_path / f"cache-{mode}"
        extract_item_features(warm, PreparingEncoder(), FeatureCache(root), batch_size, False, workers=mode)
        encoder, cache = PreparingEncoder(), FeatureCache(root)
        features = extract_item_features(items, encoder, cache, batch_size, False, workers=mode)
        entries = sorted(path.name for path in root.rglob("*.npy"))
        results[mode] = features, encoder.calls, (cache.hits, cache.misses), entries
        if mode:  # decoding runs at most one batch ahead of the encoder
            for k, prepared in enumerate(encoder.prepared_at_encode):
                assert prepared <= (k + 2) * batch_size
    sequential, threaded = results[0], results[workers]
    assert np.array_equal(sequential[0], threaded[0])
    assert sequential[1:] == threaded[1:]
    calls, (hits, misses) = sequential[1], sequential[2]
    assert sum(map(len, calls)) == 23 - 6 - 5 and sum(call.count("same") for call in calls) == 2
    assert (hits, misses) == (5, 23 - 3 - 5)  # the 3 absent images are never looked up


def test_threaded_decoding_is_the_default_and_checks_workers(tmp_path):
    items = threaded_items(tmp_path)
    reference = extract_item_features(items, CountingEncoder(), None, 4, False, workers=0)
    assert np.array_equal(extract_item_features(items, CountingEncoder(), None, 4, False), reference)
    with pytest.raises(ValueError, match="workers"):
        extract_item_features(items, CountingEncoder(), None, 4, False, workers=-1)


def test_jpeg_draft_decodes_large_jpegs_smaller():
    from reveal_recbole.image_io import decode_image as _decode

    buffer = io.BytesIO()
    image(0, (400, 300)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    assert _decode(jpeg).size == (400, 300)
    assert _decode(jpeg, (64, 64)).size == (100, 75)  # 1/4 scale: the smallest still >= 64 px
    assert _decode(png_bytes(0, (400, 300)), (64, 64)).size == (400, 300)  # only JPEGs


def bad_image_files(folder):
    """Files from the wild in an image folder, each with what its log line must say."""
    good = png_bytes(3)
    jpeg = io.BytesIO()
    image(4, (64, 48)).save(jpeg, format="JPEG")
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")  # 10 kB on disk, 81 M pixels decoded
    files = {
        "good": (good, None),
        "corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not a readable image"),
        "truncated": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "not a readable image"),
        "zero-byte": (b"", "empty file"),
        "bomb": (bomb.getvalue(), "decompression-bomb guard"),
        "not-an-image": (b"<html><body>404</body></html>", "not a readable image"),
    }
    for name, (data, _) in files.items():
        (folder / f"{name}.png").write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


def test_bad_files_in_the_image_folder_are_logged_and_replaced(tmp_path, caplog):
    reasons = bad_image_files(tmp_path)
    items = [ItemImage(name, "a prompt", tmp_path / f"{name}.png") for name in reasons]
    cache, encoder = FeatureCache(tmp_path / "cache"), CountingEncoder()
    with caplog.at_level("WARNING"):
        features = extract_item_features(items, encoder, cache, batch_size=4, show_progress=False)
    assert sum(len(call) for call in encoder.calls) == 1  # only the good image reaches the encoder
    assert np.isfinite(features).all()
    for row, (name, reason) in enumerate(reasons.items()):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"item {name}:")]
        if reason is None:
            assert not lines and not np.array_equal(features[row], missing_image_vector(name, 4))
        else:
            assert len(lines) == 1 and reason in lines[0] and f"{name}.png" in lines[0], lines
            assert np.array_equal(features[row], missing_image_vector(name, 4))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1  # a rejected image is never cached


@pytest.fixture
def image_reads(monkeypatch):
    """Every image file read (and hashed) for a cache key, by name."""
    from reveal_recbole.data import feature_cache

    reads, real = [], feature_cache.read_image_file

    def spy(path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(feature_cache, "read_image_file", spy)
    return reads


def test_a_round_reads_only_the_images_of_changed_prompts(tmp_path, image_reads):
    import os

    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
    items = [ItemImage(str(i), f"prompt {i}", tmp_path / f"{i}.png") for i in range(6)]
    cache, encoder = FeatureCache(tmp_path / "cache"), CountingEncoder()
    first = extract_item_features(items, encoder, cache, batch_size=4, show_progress=False, workers=0)
    assert sorted(image_reads) == [f"{i}.png" for i in range(6)]  # each read once: hashed, decoded

    image_reads.clear()
    changed = [*items[:2], ItemImage("2", "a new prompt", tmp_path / "2.png"), *items[3:]]
    second = extract_item_features(changed, encoder, cache, batch_size=4, show_progress=False, workers=0)
    assert image_reads == ["2.png"] and encoder.calls[-1] == ["a new prompt"]
    assert np.array_equal(np.delete(second, 2, 0), np.delete(first, 2, 0))

    image_reads.clear()  # a resumed run: the digests come back from the cache folder, no image is read
    resumed = extract_item_features(changed, encoder, FeatureCache(tmp_path / "cache"), 4, False, workers=0)
    assert image_reads == [] and np.array_equal(resumed, second) and len(encoder.calls) == 3

    stat = (tmp_path / "4.png").stat()  # a new picture of the same size, with a new mtime
    assert len(png_bytes(40)) == stat.st_size
    (tmp_path / "4.png").write_bytes(png_bytes(40))
    os.utime(tmp_path / "4.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    image_reads.clear()
    rehashed = extract_item_features(changed, encoder, FeatureCache(tmp_path / "cache"), 4, False, workers=0)
    assert image_reads == ["4.png"] and encoder.calls[-1] == ["prompt 4"]  # its old feature is not reused
    expected = extract_item_features([changed[4]], CountingEncoder(), None, show_progress=False)[0]
    assert np.array_equal(rehashed[4], expected) and not np.array_equal(rehashed[4], second[4])


# ---- batches and dtypes ---------------------------------------------------------------------

def sized_items():
    """Images of three sizes (different image-token counts for the VLM) under prompts of different lengths."""
    sizes = [(32, 32), (20, 28), (32, 16), (28, 20), (32, 32)]
    return [ItemImage(f"I{i}", PROMPTS[i % 2] * (1 + i % 3), png_bytes(i, size)) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("backend", ["clip", "vlm"])
def test_batched_extraction_equals_one_image_at_a_time(backend, tiny_clip, tiny_qwen):
    if backend == "clip":
        encoder = CLIPPromptEncoder(*tiny_clip, name="tiny-clip")
    else:
        encoder = VLMPromptEncoder(*tiny_qwen, name="tiny-qwen")
    items = sized_items()
    one_by_one = extract_item_features(items, encoder, None, batch_size=1, show_progress=False)
    batched = extract_item_features(items, encoder, None, batch_size=4, show_progress=False)
    assert batched.dtype == np.float32 and np.abs(batched - one_by_one).max() < 1e-5


def test_extract_dtype_resolution(monkeypatch):
    assert resolve_extract_dtype("auto", "cpu") == resolve_extract_dtype(None, "cpu") == torch.float32
    for supported, expected in [(True, torch.bfloat16), (False, torch.float16)]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, answer=supported, **kwargs: answer)
        assert resolve_extract_dtype("auto", torch.device("cuda:1")) == expected
        assert resolve_extract_dtype("auto", "cuda") == expected
    assert resolve_extract_dtype("float32", "cuda") == torch.float32  # a setting other than auto is taken as is
    assert resolve_extract_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fve_extract_dtype must be one of"):
        resolve_extract_dtype("fp8", "cpu")
    assert dtype_tag(torch.float32) == "" and dtype_tag(torch.float16) == "+float16"


def close_to(features, reference, cosine):
    return features.dtype == np.float32 and (np.sum(features * reference, axis=1) > cosine).all()


def test_half_precision_encoders_return_float32_features_close_to_float32_ones(tiny_clip, tiny_qwen):
    """bfloat16 on the CPU runs the same code as on a GPU: autocast for CLIP, bfloat16 weights for the VLM."""
    import copy

    images, prompts = [image(0), image(1, (20, 28))], PROMPTS
    clip = CLIPPromptEncoder(*tiny_clip, name="tiny-clip", dtype=torch.bfloat16)
    assert clip.name == "clip-text-guided-patches-v1:tiny-clip+bfloat16"  # not the float32 entries in the cache
    reference = CLIPPromptEncoder(*tiny_clip, name="tiny-clip").encode(images, prompts)
    assert close_to(clip.encode(images, prompts), reference, 0.999)

    model, processor = tiny_qwen
    vlm = VLMPromptEncoder(copy.deepcopy(model).to(torch.bfloat16), processor, name="tiny-qwen")
    assert vlm.name == "vlm-mean-image-tokens-v1:tiny-qwen+bfloat16"
    reference = VLMPromptEncoder(model, processor, name="tiny-qwen").encode(images, prompts)
    assert close_to(vlm.encode(images, prompts), reference, 0.999)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encoders_on_cuda_in_the_auto_dtype(tiny_clip, tiny_qwen):
    import copy

    dtype = resolve_extract_dtype("auto", "cuda")
    assert dtype in (torch.bfloat16, torch.float16)
    images, prompts = [image(0), image(1, (20, 28))], PROMPTS
    clip_model, processor, tokenizer = tiny_clip
    clip = CLIPPromptEncoder(copy.deepcopy(clip_model), processor, tokenizer, name="c", device="cuda", dtype=dtype)
    reference = CLIPPromptEncoder(clip_model, processor, tokenizer, name="c").encode(images, prompts)
    assert close_to(clip.encode(images, prompts), reference, 0.995)

    model, qwen_processor = tiny_qwen
    vlm = VLMPromptEncoder(copy.deepcopy(model).to("cuda", dtype), qwen_processor, name="q")
    reference = VLMPromptEncoder(model, qwen_processor, name="q").encode(images, prompts)
    assert close_to(vlm.encode(images, prompts), reference, 0.995)
