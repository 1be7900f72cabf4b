"""Where the prompt looks: patch-weight heatmaps of items whose FVE prompt changed.

For a prompt-conditioned encoder that pools patches by their similarity to the prompt
(:class:`~reveal_recbole.fve.aligned.AlignedPromptEncoder`, anything with ``patch_weights``),
the pooling weights show which regions of an image a prompt selects. This module reads an FVE
output folder (``prompt_history.jsonl``, ``state.json``), picks the items whose prompt a later
round changed, and draws a PNG grid: one row per item, its image with the patch weights of the
round-0 prompt, then with those of the item's last proposed prompt (the title says its round
and whether that round was kept).

Usage::

    python -m reveal_recbole.fve.heatmaps saved/fve-synthetic-<time> --images dataset/synthetic/images \\
        --aligner saved/aligner/aligner.pt            # writes <fve_output_dir>/heatmaps.png
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reveal_recbole.errors import UserInputError
from reveal_recbole.image_io import ImageRejected, decode_image

logger = logging.getLogger(__name__)

HISTORY_FILE = "prompt_history.jsonl"  # as fve.loop writes them
STATE_FILE = "state.json"
DEFAULT_ITEMS = 8


class HeatmapError(UserInputError):
    """An FVE folder without history, no changed prompt, or an encoder without patch weights."""


@dataclass(frozen=True)
class PromptChange:
    item: str
    initial: str  # round 0's prompt
    final: str  # the last proposed prompt
    round: int  # the round that proposed it
    kept: bool  # whether that round was kept


def changed_prompts(output: str | Path) -> list[PromptChange]:
    """Items whose prompt a round after round 0 changed, in item order of round 0's rows."""
    path = Path(output) / HISTORY_FILE
    if not path.is_file():
        raise HeatmapError(f"{path} does not exist: pass the output folder of an FVE run (fve_output_dir)")
    initial: dict[str, str] = {}
    last: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row["round"] == 0:
            initial[row["item"]] = row["new_prompt"]
        elif row.get("changed") and row.get("new_prompt") is not None:
            last[row["item"]] = row
    return [
        PromptChange(item, initial[item], last[item]["new_prompt"], int(last[item]["round"]), bool(last[item]["kept"]))
        for item in initial if item in last and last[item]["new_prompt"] != initial[item]
    ]


def _grid(weights: np.ndarray) -> np.ndarray:
    side = math.isqrt(weights.size)
    if side * side != weights.size:
        raise HeatmapError(f"{weights.size} patch weights do not form a square grid")
    return weights.reshape(side, side)


def plot_heatmaps(changes: list[PromptChange], images: dict[str, Image.Image], encoder, output: str | Path) -> Path:
    """Draw each change's image under its initial and final prompt with ``encoder.patch_weights`` overlaid."""
    from reveal_recbole.diagnostics import pyplot, save_png

    if not hasattr(encoder, "patch_weights"):
        raise HeatmapError(f"the encoder {encoder.name} exposes no patch weights (use fve_encoder=aligned)")
    plt = pyplot()
    fig, axes = plt.subplots(len(changes), 2, figsize=(7.2, 3.4 * len(changes)), squeeze=False)
    for row, change in enumerate(changes):
        shown = encoder.prepare(images[change.item])
        weights = encoder.patch_weights([shown, shown], [change.initial, change.final])
        for column, (prompt, label) in enumerate((
            (change.initial, "round 0"),
            (change.final, f"round {change.round} ({'kept' if change.kept else 'discarded'})"),
        )):
            ax = axes[row][column]
            width, height = shown.size
            ax.imshow(np.asarray(shown.convert("RGB")), extent=(0, width, height, 0))
            ax.imshow(_grid(weights[column]), cmap="inferno", alpha=0.55, extent=(0, width, height, 0),
                      interpolation="bilinear")
            ax.set_title(f"{change.item}, {label}\n" + "\n".join(textwrap.wrap(prompt, 48)[:3]), fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return save_png(fig, output)


def write_heatmaps(output_dir: str | Path, encoder, images_dir: str | Path, png: str | Path | None = None,
                   max_items: int = DEFAULT_ITEMS) -> Path:
    """The heatmap grid of up to ``max_items`` changed items with an image, written to ``png``
    (default ``<output_dir>/heatmaps.png``)."""
    from reveal_recbole.fve.sources import ItemImageSource

    output_dir = Path(output_dir)
    state_path = output_dir / STATE_FILE
    if state_path.is_file():
        run_encoder = json.loads(state_path.read_text(encoding="utf-8")).get("settings", {}).get("encoder")
        if run_encoder and run_encoder != encoder.name:
            logger.warning("the run's features came from %s; these heatmaps show %s", run_encoder, encoder.name)
    source = ItemImageSource(images_dir)
    changes, images = [], {}
    for change in changed_prompts(output_dir):
        path = source.path(change.item)
        if path is None:
            continue
        try:
            images[change.item] = decode_image(path.read_bytes())
        except (OSError, ImageRejected) as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        changes.append(change)
        if len(changes) == max_items:
            break
    if not changes:
        raise HeatmapError(
            f"no item with an image in {images_dir} had its prompt changed after round 0 in {output_dir}"
        )
    return plot_heatmaps(changes, images, encoder, png or output_dir / "heatmaps.png")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Patch-weight heatmaps of the items whose FVE prompt changed.")
    parser.add_argument("output_dir", type=Path, help="an FVE output folder (fve_output_dir)")
    parser.add_argument("--images", type=Path, help="the item image folder (default dataset/<dataset>/images)")
    parser.add_argument("--aligner", type=Path, default=None, help="the alignment head (fve_aligner_path)")
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="items to draw (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default <output_dir>/heatmaps.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from reveal_recbole.fve.aligned import AlignedPromptEncoder
    from reveal_recbole.fve.loop import DEFAULT_ALIGNER

    try:
        images = args.images
        if images is None:
            state = args.output_dir / STATE_FILE
            dataset = json.loads(state.read_text(encoding="utf-8"))["settings"]["dataset"] if state.is_file() else None
            if dataset is None:
                raise HeatmapError(f"{state} does not name the dataset: pass --images")
            images = Path("dataset") / dataset / "images"
        encoder = AlignedPromptEncoder.from_aligner(args.aligner or DEFAULT_ALIGNER)
        path = write_heatmaps(args.output_dir, encoder, images, args.out, args.items)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)
    return path


if __name__ == "__main__":
    main()
