"""Train the alignment head of the offline prompt-conditioned encoder (``fve_encoder: aligned``).

:class:`~reveal_recbole.fve.aligned.AlignedPromptEncoder` pools EfficientNet-Lite0 patch tokens
by their similarity to a MiniLM prompt embedding; a small head (two linear maps into a shared
space and a temperature) makes the two comparable. This script trains that head with a
symmetric InfoNCE loss over (image, caption) pairs, where each image is pooled under each
caption of the batch (:func:`~reveal_recbole.fve.aligned.contrastive_loss`).

Input: a captioned image folder, a TSV of ``image path<TAB>caption`` (paths relative to the TSV's
folder; an optional ``image<TAB>caption`` header). Missing or corrupt images are logged and
skipped, empty captions skipped and counted; no usable pair at all is one clear error. Or
``--generate N``: N captioned images drawn here (coloured, textured shapes with captions such
as "a striped red star"; half of them scenes of two or three shapes, the caption naming one)
with ``--generate-seed``, never the recommendation items' own images or labels.

The frozen networks run once: their outputs (patch maps as float16, caption embeddings) are
cached in ``--out`` under a digest of the images, captions and encoder names, and training
touches only the head. Training is deterministic for a seed; after every epoch a checkpoint
(head, optimiser, losses) is written atomically to ``<out>/checkpoint.pt``, and a rerun with the
same data and settings resumes from it, reaching the same head as an uninterrupted run.
``--holdout`` (10 %) of the pairs are kept out of training; their contrastive loss and caption-to-image
retrieval accuracy (within batches) are logged after every epoch and saved with the head, and the head
kept is that of the epoch with the lowest held-out loss (a linear head overfits a small set in a few epochs).
The result is ``<out>/aligner.pt``: point ``fve_aligner_path`` at it.

Usage::

    python dataset_prep/train_aligner.py --generate 1500 --out saved/aligner  # about 8 min on 2 busy cores
    python dataset_prep/train_aligner.py --captions my_images/captions.tsv --out saved/aligner-mine
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dataset_prep.common import progress
from dataset_prep.make_synthetic import COLOURS, SHAPES, TEXTURES, draw_item, hue_colour, png_bytes
from reveal_recbole.atomic import atomic_target, atomic_write_bytes, atomic_write_text
from reveal_recbole.errors import UserInputError
from reveal_recbole.fve.aligned import (
    DEFAULT_DIM,
    AlignmentHead,
    PatchBackbone,
    SentenceEncoder,
    contrastive_loss,
    save_aligner,
)
from reveal_recbole.image_io import ImageRejected, decode_image

logger = logging.getLogger("train_aligner")

CHECKPOINT = "checkpoint.pt"
ALIGNER = "aligner.pt"
CHECKPOINT_FORMAT = "reveal-aligner-checkpoint-v1"
TEXTURE_WORDS = {"plain": "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}
DEFAULT_GENERATE_SEED = 9173  # not the synthetic world's seeds: the aligner never sees its items


class AlignerDataError(UserInputError, ValueError):
    """A captioned set with no usable (image, caption) pair, or a checkpoint of other data or settings."""


# ----------------------------------------------------------------------------- captioned images
def _random_look(rng: np.random.Generator) -> tuple[str, float, str, str]:
    colour, hue = COLOURS[int(rng.integers(len(COLOURS)))]
    return colour, hue, SHAPES[int(rng.integers(len(SHAPES)))], TEXTURES[int(rng.integers(len(TEXTURES)))]


def _draw(look: tuple[str, float, str, str], size: int, rng: np.random.Generator) -> Image.Image:
    _, hue, shape, texture = look
    return draw_item(hue_colour(hue + rng.uniform(-8, 8), rng), shape, texture, size, rng, pixel_noise=6.0)


def generate_captioned(out: Path, count: int, seed: int = DEFAULT_GENERATE_SEED, size: int = 64,
                       scenes: float = 0.5) -> Path:
    """Draw ``count`` captioned images into ``out`` (``images/`` and ``captions.tsv``); returns the TSV.

    Each caption names a shape's texture, colour and kind ("a striped red star"), drawn by
    make_synthetic's :func:`draw_item`. A fraction ``1 - scenes`` of the images show that shape
    alone; the others are scenes: a 2 x 2 layout with the captioned shape in one cell and one or
    two other shapes (another colour and kind) in others, so that matching the caption needs
    finding the region it describes, which is what prompt-conditioned pooling does.
    """
    rng = np.random.default_rng(seed)
    rows = ["image\tcaption"]
    for index in range(count):
        look = _random_look(rng)
        if rng.random() >= scenes:
            image = _draw(look, size, rng)
        else:
            half = size // 2
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 256, 3)))
            cells = rng.permutation(4)[: int(rng.integers(2, 4))]  # the captioned shape and 1-2 others
            others = []
            while len(others) < len(cells) - 1:
                other = _random_look(rng)
                if other[0] != look[0] and other[2] != look[2]:
                    others.append(other)
            for cell, drawn in zip(cells, [look, *others]):
                image.paste(_draw(drawn, half, rng), (int(cell % 2) * half, int(cell // 2) * half))
        relative = f"images/{index:05d}.png"
        atomic_write_bytes(out / relative, png_bytes(image))
        colour, _, shape, texture = look
        rows.append(f"{relative}\ta {TEXTURE_WORDS[texture]} {colour} {shape}")
    tsv = out / "captions.tsv"
    atomic_write_text(tsv, "\n".join(rows) + "\n")
    return tsv


@dataclass
class PairCounts:
    rows: int = 0
    empty_captions: int = 0
    missing_images: int = 0
    corrupt_images: int = 0
    usable: int = 0


def read_pairs(tsv: Path) -> tuple[list[tuple[Path, str]], PairCounts]:
    """(image path, caption) rows of ``tsv`` with a non-empty caption; counts of what was skipped."""
    counts = PairCounts()
    pairs = []
    for number, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.lower().startswith("image\t")):
            continue
        counts.rows += 1
        path, _, caption = line.partition("\t")
        caption = " ".join(caption.split())
        if not caption:
            counts.empty_captions += 1
            continue
        pairs.append((tsv.parent / path.strip(), caption))
    return pairs, counts


# ----------------------------------------------------------------------------- frozen outputs
def frozen_outputs(
    pairs: Sequence[tuple[Path, str]], counts: PairCounts, backbone: PatchBackbone, text_encoder: SentenceEncoder,
    cache_dir: Path, batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """Patch tokens ``(N, P, C)`` (as float16 values, float32 type) and caption embeddings ``(N, T)`` of the usable
    pairs, the data key and the usable pairs' captions; read from ``cache_dir`` when this data and these encoders
    were encoded before."""
    usable: list[tuple[bytes, str]] = []
    digest = hashlib.sha256(f"{backbone.name}\n{text_encoder.name}\n".encode())
    for path, caption in pairs:
        try:
            data = path.read_bytes()
        except OSError as error:
            logger.warning("skipping %s: cannot read it (%s)", path, error.strerror or error)
            counts.missing_images += 1
            continue
        try:
            decode_image(data)
        except ImageRejected as error:
            logger.warning("skipping %s: %s", path, error)
            counts.corrupt_images += 1
            continue
        usable.append((data, caption))
        digest.update(hashlib.sha256(data).digest())
        digest.update(caption.encode("utf-8") + b"\n")
    counts.usable = len(usable)
    caption_texts = [caption for _, caption in usable]
    if not usable:
        raise AlignerDataError(
            f"no usable (image, caption) pair: {counts.rows} rows, {counts.empty_captions} empty captions, "
            f"{counts.missing_images} missing and {counts.corrupt_images} corrupt images"
        )
    key = digest.hexdigest()[:20]
    cached = cache_dir / f"frozen-{key}.npz"
    if cached.is_file():
        with np.load(cached) as stored:
            logger.info("frozen encoder outputs read from %s", cached)
            return stored["patches"].astype(np.float32), stored["captions"].astype(np.float32), key, caption_texts
    patches, texts = [], []
    starts = range(0, len(usable), batch_size)
    for start in progress(starts, desc="frozen encoders", total=len(starts), unit="batch"):
        batch = usable[start:start + batch_size]
        images = [backbone.prepare(decode_image(data)) for data, _ in batch]
        patches.append(backbone.patch_tokens(images).float().numpy().astype(np.float16))
        texts.append(np.asarray(text_encoder.encode([caption for _, caption in batch]), dtype=np.float32))
    patch_array, caption_array = np.concatenate(patches), np.concatenate(texts)
    with atomic_target(cached) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, patches=patch_array, captions=caption_array)
    return patch_array.astype(np.float32), caption_array, key, caption_texts


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainSettings:
    dim: int = DEFAULT_DIM
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    holdout: float = 0.1  # fraction of the pairs kept out of training, to report held-out loss and retrieval


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): a seeded permutation's first ``round(count * fraction)`` rows are held
    out (none when that is under 2: a contrastive batch needs two pairs)."""
    order = np.random.default_rng(seed).permutation(count)
    held = int(round(count * fraction))
    held = held if 2 <= held <= count - 2 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(s, s + batch_size) for s in range(0, count, batch_size) if min(count, s + batch_size) - s > 1]


def epoch_loss(head: AlignmentHead, patches: torch.Tensor, captions: torch.Tensor, batch_size: int) -> float:
    """Mean contrastive loss over the data in fixed order (no update): what training lowers."""
    with torch.no_grad():
        losses = [float(contrastive_loss(head, patches[b], captions[b])) for b in _batches(len(patches), batch_size)]
    return float(np.mean(losses))


def retrieval_accuracy(head: AlignmentHead, patches: torch.Tensor, captions: torch.Tensor, texts: Sequence[str],
                       batch_size: int) -> float:
    """Share of captions whose best-scoring image, among a batch of ``batch_size`` (fixed order), carries the
    same caption text (chance: about 1 / batch_size for distinct captions)."""
    hits = total = 0
    with torch.no_grad():
        for batch in _batches(len(patches), batch_size):
            best = head.contrastive_logits(patches[batch], captions[batch]).argmax(dim=0).tolist()
            names = list(texts[batch])
            hits += sum(names[image] == names[caption] for caption, image in enumerate(best))
            total += len(best)
    return hits / max(total, 1)


def train_head(
    patches: np.ndarray, captions: np.ndarray, out: Path, epochs: int, settings: TrainSettings, data_key: str,
    texts: Sequence[str] | None = None,
) -> tuple[AlignmentHead, list[float], list[dict], int | None]:
    """Train the head for ``epochs`` epochs in total, resuming from ``<out>/checkpoint.pt`` when it holds a
    run of the same data and settings. Returns the head, the training loss (:func:`epoch_loss`) and the
    held-out loss and retrieval accuracy (``settings.holdout`` of the pairs) after each epoch, and the epoch
    whose head is returned: the one of the lowest held-out loss (the head overfits a small set), or the
    last epoch's head (None) without a held-out part.

    Epoch ``e`` shuffles with a generator seeded by (seed, e), and the initial head comes from
    ``seed`` alone, so a resumed run continues exactly where the interrupted one stopped.
    """
    texts = np.asarray(list(texts) if texts is not None else [str(i) for i in range(len(patches))], dtype=object)
    train_rows, held_rows = holdout_split(len(patches), settings.holdout, settings.seed)
    patch_tensor, caption_tensor = torch.from_numpy(patches[train_rows]), torch.from_numpy(captions[train_rows])
    held_patches, held_captions = torch.from_numpy(patches[held_rows]), torch.from_numpy(captions[held_rows])
    held_texts = texts[held_rows]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = AlignmentHead(patches.shape[2], captions.shape[1], settings.dim)
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    losses: list[float] = []
    held_out: list[dict] = []
    best: dict = {"epoch": None, "head": None}  # the epoch of the lowest held-out loss and its head

    def evaluate() -> dict:
        if not len(held_rows):
            return {}
        return {"loss": epoch_loss(head, held_patches, held_captions, settings.batch_size),
                "retrieval@1": retrieval_accuracy(head, held_patches, held_captions, held_texts, settings.batch_size)}

    checkpoint_path = out / CHECKPOINT
    identity = {"format": CHECKPOINT_FORMAT, "data": data_key, "settings": asdict(settings)}
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if {key: checkpoint.get(key) for key in identity} != identity:
            raise AlignerDataError(
                f"{checkpoint_path} is a run of other data or settings ({checkpoint.get('settings')}); "
                "remove it or choose another --out"
            )
        head.load_state_dict(checkpoint["head"])
        optimiser.load_state_dict(checkpoint["optimizer"])
        losses, held_out = list(checkpoint["losses"]), list(checkpoint["held_out"])
        best = {"epoch": checkpoint["best_epoch"], "head": checkpoint["best_head"]}
        logger.info("resuming after epoch %d from %s", len(losses), checkpoint_path)
    else:
        logger.info("%d training pairs, %d held out; before training: loss %.4f, held out %s", len(train_rows),
                    len(held_rows), epoch_loss(head, patch_tensor, caption_tensor, settings.batch_size), evaluate())
    for epoch in range(len(losses), epochs):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        order = torch.randperm(len(train_rows), generator=generator)
        head.train()
        for batch in _batches(len(order), settings.batch_size):  # a contrastive batch needs two pairs
            rows = order[batch]
            loss = contrastive_loss(head, patch_tensor[rows], caption_tensor[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        head.eval()
        losses.append(epoch_loss(head, patch_tensor, caption_tensor, settings.batch_size))
        held_out.append(evaluate())
        if held_out[-1] and (best["epoch"] is None or held_out[-1]["loss"] < held_out[best["epoch"] - 1]["loss"]):
            best = {"epoch": epoch + 1, "head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
        with atomic_target(checkpoint_path) as temporary:
            torch.save({**identity, "head": head.state_dict(), "optimizer": optimiser.state_dict(), "losses": losses,
                        "held_out": held_out, "best_epoch": best["epoch"], "best_head": best["head"]}, temporary)
        logger.info("epoch %d/%d: loss %.4f, held out %s, scale %.1f (%.1f s)", epoch + 1, epochs, losses[-1],
                    {k: round(v, 4) for k, v in held_out[-1].items()}, float(head.scale.detach()),
                    time.perf_counter() - started)
    if best["head"] is not None:
        head.load_state_dict(best["head"])
        logger.info("keeping the head of epoch %d (lowest held-out loss)", best["epoch"])
    return head, losses, held_out, best["epoch"]


def train_aligner(
    captions_tsv: Path, out: Path, backbone: PatchBackbone, text_encoder: SentenceEncoder, epochs: int = 12,
    settings: TrainSettings = TrainSettings(), encode_batch_size: int = 32,
) -> dict:
    """Read the pairs, encode them once (cached), train the head (resumable) and write ``<out>/aligner.pt``."""
    pairs, counts = read_pairs(Path(captions_tsv))
    if counts.empty_captions:
        logger.warning("skipped %d rows with an empty caption", counts.empty_captions)
    patches, captions, key, texts = frozen_outputs(pairs, counts, backbone, text_encoder, out, encode_batch_size)
    head, losses, held_out, best_epoch = train_head(patches, captions, out, epochs, settings, key, texts)
    info = {"pairs": asdict(counts), "epochs": epochs, "losses": losses, "held_out": held_out, "best_epoch": best_epoch,
            "settings": asdict(settings), "data": key, "captions": str(captions_tsv)}
    path = save_aligner(out / ALIGNER, head, backbone.name, text_encoder.name, info)
    logger.info("wrote %s (%d pairs used; epoch %s kept; held out %s)", path, counts.usable, best_epoch or epochs,
                held_out[(best_epoch or epochs) - 1] if held_out else None)
    return {"aligner": str(path), **info}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", type=Path, help="TSV of image path<TAB>caption (paths relative to it)")
    source.add_argument("--generate", type=int, metavar="N", help="draw N captioned shape images into <out>/captioned")
    parser.add_argument("--generate-seed", type=int, default=DEFAULT_GENERATE_SEED)
    parser.add_argument("--out", type=Path, default=Path("saved/aligner"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="fraction of pairs held out: reported, and the epoch of lowest held-out loss is kept")
    parser.add_argument("--scenes", type=float, default=0.5, help="--generate: fraction of multi-shape scenes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from reveal_recbole.data.text_features import TextEncoder
    from reveal_recbole.fve.aligned import EfficientNetPatches

    try:
        tsv = args.captions
        if args.generate is not None:
            if args.generate < 2:
                raise AlignerDataError("--generate needs at least 2 images")
            tsv = generate_captioned(args.out / "captioned", args.generate, args.generate_seed, scenes=args.scenes)
        settings = TrainSettings(args.dim, args.batch_size, args.lr, seed=args.seed, holdout=args.holdout)
        return train_aligner(tsv, args.out, EfficientNetPatches.from_package(device=args.device),
                             TextEncoder.from_pretrained(device=args.device), args.epochs, settings)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
