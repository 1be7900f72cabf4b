"""Does the aligned encoder's prompt select the region it names? Localisation on new two-shape scenes.

Each scene (drawn with ``dataset_prep/train_aligner.py``'s shapes, seed ``--seed``, never the
training seed) holds two shapes of different colours and kinds in two cells of a 2 x 2 layout.
Each shape is named in turn by a prompt ("a red star"); the prompt localises when the
:class:`~reveal_recbole.fve.aligned.AlignedPromptEncoder`'s patch weights put more mass on the
3 x 3 patch block of the named shape's cell than on the other shape's (the 7 x 7 map's middle
row and column straddle two cells and are left out). Prints the share of prompts that localise
and the mean margin (mass on the named cell minus mass on the other), and with ``--png`` draws
the first scenes' heatmaps under both prompts.

    python benchmarks/bench_aligner.py saved/aligner/aligner.pt --scenes 60 --png saved/aligner/scenes.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from dataset_prep.train_aligner import _draw, _random_look
from reveal_recbole.fve.aligned import AlignedPromptEncoder
from reveal_recbole.fve.heatmaps import PromptChange, plot_heatmaps

BLOCKS = {0: slice(0, 3), 1: slice(4, 7)}  # patch rows / columns of the 7 x 7 map inside each half


def scenes(count: int, seed: int, size: int = 64) -> list[tuple[Image.Image, list[tuple[str, int, int]]]]:
    """``count`` scenes, each with its two (prompt, named cell, other cell)."""
    rng = np.random.default_rng(seed)
    half = size // 2
    drawn = []
    for _ in range(count):
        first = _random_look(rng)
        second = _random_look(rng)
        while second[0] == first[0] or second[2] == first[2]:
            second = _random_look(rng)
        image = Image.new("RGB", (size, size), (240, 240, 240))
        cell_a, cell_b = (int(c) for c in rng.permutation(4)[:2])
        for cell, look in ((cell_a, first), (cell_b, second)):
            image.paste(_draw(look, half, rng), ((cell % 2) * half, (cell // 2) * half))
        drawn.append((image, [(f"a {first[0]} {first[2]}", cell_a, cell_b), (f"a {second[0]} {second[2]}", cell_b,
                                                                             cell_a)]))
    return drawn


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("aligner", type=Path)
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=424242)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args(argv)
    encoder = AlignedPromptEncoder.from_aligner(args.aligner)
    drawn = scenes(args.scenes, args.seed)
    images = [image for image, named in drawn for _ in named]
    prompts = [prompt for _, named in drawn for prompt, _, _ in named]
    cells = [(cell, other) for _, named in drawn for _, cell, other in named]
    weights = encoder.patch_weights(images, prompts).reshape(len(images), 7, 7)

    def mass(grid: np.ndarray, cell: int) -> float:
        return float(grid[BLOCKS[cell // 2], BLOCKS[cell % 2]].sum())

    margins = np.array([mass(grid, cell) - mass(grid, other) for grid, (cell, other) in zip(weights, cells)])
    result = {"prompts": len(margins), "localised": int((margins > 0).sum()), "mean_margin": float(margins.mean())}
    print(f"{result['localised']}/{result['prompts']} prompts put more patch weight on the shape they name "
          f"(mean margin {result['mean_margin']:.3f})")
    if args.png:
        changes = [PromptChange(f"scene {k}", named[0][0], named[1][0], 1, True) for k, (_, named) in
                   enumerate(drawn[:4])]
        plot_heatmaps(changes, {f"scene {k}": image for k, (image, _) in enumerate(drawn[:4])}, encoder, args.png)
        print(args.png)
    return result


if __name__ == "__main__":
    main()
