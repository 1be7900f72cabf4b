"""FVE step 2: prompt-conditioned image features for every item, recomputing only cache misses.

An :class:`ImageEncoder` maps (image, prompt) pairs to L2-normalised vectors. Backends:

- :class:`VLMPromptEncoder`: the paper's extractor. A vision-language model (Qwen2.5-VL) reads
  the image and the prompt; the feature is the mean of the last hidden states at the
  image-token positions, so the prompt shapes the image tokens through attention.
- :class:`CLIPPromptEncoder`: a light CPU-friendly variant. CLIP's patch tokens are projected
  into the joint space and pooled with weights softmax(similarity to the prompt's text
  embedding), so the prompt chooses which regions of the image the feature describes.

:func:`extract_item_features` runs an encoder over a catalogue in batches, reading unchanged
(image, prompt, encoder) triples from a :class:`~reveal_recbole.data.feature_cache.FeatureCache`.
On a GPU both encoders run in a half-precision dtype (:func:`resolve_extract_dtype`); features
are returned and cached as float32 either way.
"""
from __future__ import annotations

import abc
import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from reveal_recbole.data.feature_cache import FeatureCache, image_digest, read_image_file
from reveal_recbole.image_io import ImageRejected, decode_image

logger = logging.getLogger(__name__)


class ImageEncoder(abc.ABC):
    """Encodes images under prompts. ``name`` identifies model, revision and pooling in cache keys."""

    name: str
    dim: int
    # (width, height) an image needs at least, or None: JPEGs larger than twice that are decoded
    # at a reduced DCT scale (PIL's ``Image.draft``). This changes the pixels, so an encoder that
    # sets it must say so in ``name`` (its features differ from those of full decodes).
    draft_size: tuple[int, int] | None = None

    def prepare(self, image: Image.Image) -> Image.Image:
        """Per-image preprocessing that :func:`extract_item_features` runs in its decode threads
        (PIL releases the GIL), before :meth:`encode` sees the batch. It must not change
        :meth:`encode`'s result: encoding ``prepare(image)`` equals encoding ``image``. Default: none."""
        return image

    @abc.abstractmethod
    def encode(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """``(len(images), dim)`` float32 rows of unit L2 norm, row ``i`` for ``images[i]`` under ``prompts[i]``."""


EXTRACT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_extract_dtype(setting: str | None, device: str | torch.device) -> torch.dtype:
    """The dtype a Hugging Face encoder runs in (config key ``fve_extract_dtype``).

    ``auto`` (or None): bfloat16 on a CUDA device that supports it, else float16 there (half the
    memory and far more images/s than float32 on tensor cores), float32 on the CPU, where half
    precision is slow. Any other setting is taken as it is.
    """
    setting = setting or "auto"
    if setting not in EXTRACT_DTYPES:
        raise ValueError(f"fve_extract_dtype must be one of {EXTRACT_DTYPES}, got {setting!r}")
    if setting != "auto":
        return getattr(torch, setting)
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_tag(dtype: torch.dtype) -> str:
    """The suffix an encoder's ``name`` gets for a dtype other than float32: its features differ
    slightly, so they must not share cache entries with float32 ones."""
    return "" if dtype == torch.float32 else f"+{str(dtype).removeprefix('torch.')}"


def text_guided_pooling(patch_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float) -> torch.Tensor:
    """Pool patches ``(B, P, D)`` with softmax(scale * cos(patch, text)) weights; ``text_embeds`` is ``(B, D)``.

    Returns the L2-normalised weighted mean ``(B, D)``. ``scale`` is an inverse temperature
    (CLIP's learned ``logit_scale.exp()``): larger values focus on fewer patches.
    """
    similarity = torch.einsum("bpd,bd->bp", F.normalize(patch_embeds, dim=-1), F.normalize(text_embeds, dim=-1))
    weights = torch.softmax(scale * similarity, dim=1)
    return F.normalize(torch.einsum("bp,bpd->bd", weights, patch_embeds), dim=-1)


def _pooled(output) -> torch.Tensor:
    """``get_text_features`` returns a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPPromptEncoder(ImageEncoder):
    """CLIP patch tokens pooled by their similarity to the prompt (see :func:`text_guided_pooling`).

    Patch tokens (the vision tower's last hidden states without the class token) go through
    the same ``post_layernorm`` and ``visual_projection`` as CLIP's pooled image embedding, so
    they live in the space of the prompt's text embedding.
    """

    POOLING = "clip-text-guided-patches-v1"

    def __init__(self, model, image_processor, tokenizer, name: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        """``dtype``: the autocast dtype of :meth:`encode` (weights stay float32: CLIP is small, and
        autocast keeps norms and softmax in float32)."""
        self.model = model.eval().to(device)
        self.image_processor, self.tokenizer, self.device = image_processor, tokenizer, torch.device(device)
        self.dtype = dtype
        self.name = f"{self.POOLING}:{name}{dtype_tag(dtype)}"
        self.dim = model.config.projection_dim
        self.max_text_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, device: str = "cpu",
                        dtype: str | None = "auto") -> CLIPPromptEncoder:
        """``dtype``: a :func:`resolve_extract_dtype` setting."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(name_or_path, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        return cls(model, image_processor, tokenizer, name=f"{name_or_path}@{revision or 'default'}", device=device,
                   dtype=resolve_extract_dtype(dtype, device))

    @torch.no_grad()
    def encode(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            text_embeds = _pooled(
                self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            )
            vision = self.model.vision_model(pixel_values=pixel_values)
            hidden = self.model.vision_model.post_layernorm(vision.last_hidden_state[:, 1:])
            patches = self.model.visual_projection(hidden)
        pooled = text_guided_pooling(patches.float(), text_embeds.float(), float(self.model.logit_scale.exp()))
        return pooled.cpu().numpy()


def mean_over_image_tokens(hidden: torch.Tensor, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Mean of ``hidden`` ``(B, T, D)`` over the positions where ``input_ids == image_token_id``, L2-normalised.

    Rows may hold different numbers of image tokens (images of different sizes); a row without
    any is an error, since its feature would silently be zero.
    """
    mask = (input_ids == image_token_id).to(hidden.dtype).unsqueeze(-1)
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        rows = torch.nonzero(counts.squeeze(-1) == 0).flatten().tolist()
        raise ValueError(f"no image tokens (id {image_token_id}) in rows {rows}")
    return F.normalize((hidden * mask).sum(dim=1) / counts, dim=-1)


class VLMPromptEncoder(ImageEncoder):
    """The paper's extractor: a vision-language model reads image + prompt; the feature is
    :func:`mean_over_image_tokens` of its last hidden states.

    The prompt comes *before* the image in the message. The decoder is causal: image tokens
    attend only to earlier tokens, so in the usual image-then-text order their hidden states,
    and hence the feature, would not depend on the prompt at all.

    Built for Qwen2.5-VL (its processor expands the image placeholder into one token per
    merged patch); any model whose processor does the same and whose config names
    ``image_token_id`` works. Only the decoder's hidden states are computed, not the
    vocabulary logits. transformers' Qwen2.5-VL processor needs torchvision.
    """

    POOLING = "vlm-mean-image-tokens-v1"

    def __init__(self, model, processor, name: str):
        """``model`` in the dtype and on the device it runs in (see :meth:`from_pretrained`)."""
        self.model, self.processor = model.eval(), processor
        self.name = f"{self.POOLING}:{name}{dtype_tag(model.dtype)}"
        self.image_token_id = int(model.config.image_token_id)
        text_config = getattr(model.config, "text_config", model.config)
        self.dim = int(text_config.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        revision: str | None = None,
        load_in_4bit: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | None = "auto",
        max_pixels: int | None = None,
    ) -> VLMPromptEncoder:
        """Load model and processor by hub name or local path onto ``device``, the weights in ``dtype`` (a
        :func:`resolve_extract_dtype` setting: bfloat16 or float16 on a GPU halves the memory of float32);
        ``load_in_4bit`` needs bitsandbytes and a GPU (as the authors ran the 7B model); ``max_pixels``
        bounds the image tokens per image."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = resolve_extract_dtype(dtype, device)
        quantization = None
        if load_in_4bit:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError("load_in_4bit needs bitsandbytes: pip install bitsandbytes (CUDA machines)")
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
            )
        processor_kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision, **processor_kwargs)
        # a device_map needs accelerate; bitsandbytes needs one (it quantizes while placing the weights)
        placement = {"device_map": {"": str(device)}} if load_in_4bit else {}
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, revision=revision, dtype=torch_dtype, quantization_config=quantization, **placement
        )
        if not load_in_4bit:
            model = model.to(device)
        suffix = "-4bit" if load_in_4bit else ""
        return cls(model, processor, name=f"{name_or_path}@{revision or 'default'}{suffix}")

    def messages(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image"}]}]

    @torch.no_grad()
    def encode(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        texts = [self.processor.apply_chat_template(self.messages(p), tokenize=False) for p in prompts]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        device, dtype = self.model.device, self.model.dtype  # pixel values in the weights' dtype
        inputs = {
            name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for name, value in inputs.items()
        }
        decoder = getattr(self.model, "model", self.model)  # the base model: hidden states without the LM head
        hidden = decoder(**inputs).last_hidden_state
        return mean_over_image_tokens(hidden.float(), inputs["input_ids"], self.image_token_id).cpu().numpy()


@dataclass(frozen=True)
class ItemImage:
    """One item to encode: its token, its current prompt, and its image (a file path, the
    file's bytes, or None when the item has no image)."""

    token: str
    prompt: str
    image: str | os.PathLike | bytes | None


def missing_image_vector(token: str, dim: int) -> np.ndarray:
    """A fixed random unit vector for an item without an image, seeded by the SHA-256 of its token.

    The authors give image-less items a random unit vector; seeding by token keeps it the same
    across runs, processes and FVE rounds (Python's ``hash`` is salted per process), and
    different for each item, so the model can still tell them apart.
    """
    seed = int.from_bytes(hashlib.sha256(token.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _key(item: ItemImage, encoder_name: str, cache: FeatureCache | None) -> tuple[str | None, bytes | None]:
    """The item's cache key (None without a cache) and its image bytes when they were read: a
    file whose digest :class:`~reveal_recbole.data.feature_cache.ImageDigests` remembers is not
    read. An absent image raises FileNotFoundError."""
    source = item.image
    if source is None:
        raise FileNotFoundError("no image")
    if cache is None:
        return None, source if isinstance(source, bytes) else read_image_file(source)[0]
    digest, data = (image_digest(source), source) if isinstance(source, bytes) else cache.digests.digest(source)
    return FeatureCache.key(digest, item.prompt, encoder_name), data


def _describe(source: str | os.PathLike | bytes | None) -> str:
    return f"({len(source)} bytes)" if isinstance(source, bytes) else str(source)


def _load(data: bytes, encoder: ImageEncoder) -> Image.Image | ImageRejected:
    """Decode ``data`` and run the encoder's per-image preparation (in a decode thread);
    a rejected image comes back as its :class:`ImageRejected` (logged with the item)."""
    try:
        return encoder.prepare(decode_image(data, encoder.draft_size))
    except ImageRejected as error:
        return error


def default_decode_workers() -> int:
    """Decode threads: as many as CPUs, at most 4 (decoding is a fraction of the network's cost)."""
    return max(1, min(4, os.cpu_count() or 1))


def extract_item_features(
    items: Sequence[ItemImage],
    encoder: ImageEncoder,
    cache: FeatureCache | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
    workers: int | None = None,
) -> np.ndarray:
    """``(len(items), encoder.dim)`` float32 features, row ``i`` for ``items[i]``.

    Cached (image, prompt, encoder) triples are read back; the misses are encoded in batches of
    ``batch_size`` and stored. Items whose image is absent (None, a missing file, or bytes PIL
    cannot decode) get :func:`missing_image_vector` and are never cached. Write the result with
    ``reveal_recbole.data.features.write_item_features(dir, dataset, "image", tokens, features)``.

    An image file is read only for a miss: its digest (part of the key) comes from the cache's
    :class:`~reveal_recbole.data.feature_cache.ImageDigests` while the file's size, mtime and
    inode are unchanged, and is saved there at the end. A file read for its digest is read once:
    hashed and, on a miss, decoded from the same bytes; a miss on a remembered digest reads the
    file and keys the new feature by the digest of what was read. Decoding (and
    :meth:`ImageEncoder.prepare`, e.g. the resize) runs in ``workers`` threads (default
    :func:`default_decode_workers`; 0 decodes in this thread), one batch ahead: while batch k runs
    through the encoder, batch k+1 is decoded. At most two batches of images are held at a time.
    Batches, encoder calls, features and cache reads and writes are the same for any ``workers``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    workers = default_decode_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    begin = time.perf_counter()
    features = np.empty((len(items), encoder.dim), dtype=np.float32)
    missing: list[int] = []
    missed_keys: set[str] = set()
    counts = {"misses": 0, "absent": 0, "undecodable": 0}

    def lookups() -> Iterator[tuple[int, str, bytes]]:
        """Cache misses in item order as (row, key, bytes); hits are written to ``features``."""
        for row, item in enumerate(items):
            try:
                key, data = _key(item, encoder.name, cache)
                if cache is None:
                    cached = None
                elif key in missed_keys:
                    # Missed earlier in this call and perhaps stored since: a miss, as when every
                    # lookup came before the first write.
                    cache.misses += 1
                    cached = None
                else:
                    cached = cache.get(key)
                if cached is None and data is None:  # a miss on a remembered digest: read the file now,
                    digest, data = cache.digests.read(item.image)  # and key it by what was read
                    key = FeatureCache.key(digest, item.prompt, encoder.name)
            except FileNotFoundError:
                missing.append(row)
                counts["absent"] += 1
                continue
            if cached is None:
                missed_keys.add(key)
                counts["misses"] += 1
                yield row, key, data
            elif cached.shape != (encoder.dim,):
                raise ValueError(f"cached feature of shape {cached.shape} for {encoder.name}, of dim {encoder.dim}")
            else:
                features[row] = cached

    def batches() -> Iterator[list[tuple[int, str, bytes]]]:
        batch = []
        for miss in lookups():
            batch.append(miss)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def encode(batch: list[tuple[int, str, bytes]], images: list[Image.Image | ImageRejected]) -> None:
        for (row, _, _), image in zip(batch, images):
            if isinstance(image, ImageRejected):
                logger.warning("item %s: image %s skipped: %s", items[row].token, _describe(items[row].image), image)
                missing.append(row)
                counts["undecodable"] += 1
        decoded = [
            (row, key, image) for (row, key, _), image in zip(batch, images) if not isinstance(image, ImageRejected)
        ]
        if not decoded:
            return
        prompts = [items[row].prompt for row, _, _ in decoded]
        vectors = np.asarray(encoder.encode([image for _, _, image in decoded], prompts))
        if vectors.shape != (len(decoded), encoder.dim) or not np.isfinite(vectors).all():
            raise ValueError(
                f"encoder {encoder.name} returned shape {vectors.shape} or non-finite values for {len(decoded)} images"
            )
        for (row, key, _), vector in zip(decoded, vectors):
            features[row] = vector
            if cache is not None:
                cache.put(key, vector)

    progress = tqdm(desc=f"image features ({encoder.name})", unit="batch", disable=not show_progress)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="fve-decode") if workers else None
    try:
        if pool is None:
            for batch in batches():
                encode(batch, [_load(data, encoder) for _, _, data in batch])
                progress.update()
        else:
            previous: tuple[list, list[Future]] | None = None
            for batch in batches():  # reading and hashing batch k+1 overlaps decoding batch k
                loading = [pool.submit(_load, data, encoder) for _, _, data in batch]
                if previous is not None:  # the encoder runs batch k while batch k+1 decodes
                    encode(previous[0], [future.result() for future in previous[1]])
                    progress.update()
                previous = (batch, loading)
            if previous is not None:
                encode(previous[0], [future.result() for future in previous[1]])
                progress.update()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        progress.close()

    if cache is not None:
        cache.digests.save()
    for row in missing:
        features[row] = missing_image_vector(items[row].token, encoder.dim)
    encoded = counts["misses"] - counts["undecodable"]
    logger.info(
        "image features: %d items, %d read from cache, %d encoded (%.1f images/s), %d without a usable image",
        len(items), len(items) - counts["misses"] - counts["absent"], encoded,
        encoded / (time.perf_counter() - begin), len(missing),
    )
    return features
