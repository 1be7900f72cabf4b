"""Generate a synthetic visual-preference dataset: users follow tastes that only the item images show.

Items are real PNG images drawn with Pillow: a shape (circle, square, triangle, cross, star)
in a colour of any hue (uniform on the colour wheel), with a texture (plain, stripes, dots,
checks) that no user cares about, random size, position, rotation, background tint and
Gaussian pixel noise. Every item also gets a coarse category ("home decor", "toys", ...) drawn
independently of its look, and its text is only that category, so the text says nothing about
what a user likes.

Each user has a visual taste: a favourite hue h_u and a favourite shape s_u. A sequence of
``--min-len`` to ``--max-len`` distinct items is drawn step by step: with probability
``1 - --noise`` an unseen item chosen with weight exp(-d^2 / (2 w^2)) if its shape is s_u (0
otherwise), d its hue's distance to h_u in degrees and w = ``--hue-width``; otherwise any unseen
item. The taste is continuous (no two users need share it exactly), so item IDs learn it only
slowly from co-occurrence while the images show it directly: the images carry the preference
and the text does not.

Output (``--out``, default ``dataset/<name>``), all files byte-identical for the same flags:

* ``<name>.inter``: user_id, item_id, timestamp = position in the sequence (0, 1, ...);
* ``<name>.item``: title = category, categories = ``synthetic > <category>``, brand and
  description empty;
* ``images/<item>.png`` (``--image-size`` pixels square, RGB) and ``<name>.images.tsv``
  (``item_id<TAB>image_urls``, here paths relative to the dataset folder);
* ``<name>.text.npy/.items``: the text feature is a fixed random unit vector per category
  (``--text-dim``, drawn from the seed), identical for all items of a category, standing in for
  a text encoder that reads the category name;
* ``<name>.image.npy/.items``: an offline image descriptor computed from the PNG pixels as read
  back from disk (never from the generator's labels); see ``image_descriptor``;
* ``<name>.truth.tsv``: the hidden labels (item, hue, shape, texture, category) and
  ``<name>.user_tastes.tsv`` (user, hue, shape), for analysis only; no model input uses them.

**A cluttered world, where the prompt matters** (FVE, issue 12). With ``--distractors D`` (1-3)
each image is a 2 x 2 layout: the item's own object (the cue users' taste depends on) in one
cell and D distractor objects, each of another of the world's shapes and a hue at least
:data:`DISTRACTOR_HUE_GAP` degrees away, in others, so pooling over the whole image mixes the
distractors in and only a prompt that names the item's object can single it out.
``<name>.regions.tsv`` (item, the item cell's box ``x0 y0 x1 y1`` in pixels, end exclusive, the
image size, and the distractors) records where the item's object is, for analysis only. With
``--reviews P`` each *training* interaction (all but a user's last two, which leave-one-out
makes the validation and test targets) gets a review with probability P, written to
``<name>.reviews`` (``item_id<TAB>review``, as ``reveal_recbole.fve.sources`` reads it): with
probability ``--review-filler`` it says nothing useful, with ``--review-distractor`` it names a
distractor's colour and shape (in an image without distractors: nothing useful), otherwise the
item's own colour name (the nearest of :data:`COLOURS`) and shape. The ``.item`` file stays
category-only, so no title or keyword gives the cue away. Both flags default to 0, which
leaves every file byte-identical to a run without them. The named preset is
``properties/dataset/synthetic_clutter.yaml``::

    python dataset_prep/make_synthetic.py --name synthetic_clutter --users 1200 --items 500 --distractors 2 \
        --reviews 0.6 --max-len 12

Usage::

    python dataset_prep/make_synthetic.py                      # dataset/synthetic, seed 0
    python dataset_prep/make_synthetic.py --seed 1 --users 2000 --items 600 --out /tmp/syn --name syn
"""
from __future__ import annotations

import argparse
import colorsys
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataset_prep.common import progress, summary, write_inter, write_item_table
from reveal_recbole.atomic import atomic_write_bytes, atomic_write_text
from reveal_recbole.data.features import write_item_features

SHAPES = ("circle", "square", "triangle", "cross", "star")
TEXTURES = ("plain", "stripes", "dots", "checks")
CATEGORIES = (
    "home decor", "toys", "sports gear", "office supplies", "kitchen goods", "garden tools", "bath goods",
    "pet supplies",
)
# Colour names and their hues (degrees): review and caption wording for a hue.
COLOURS = (("red", 0), ("orange", 30), ("yellow", 55), ("green", 120), ("cyan", 180), ("blue", 225),
           ("purple", 275), ("pink", 320))
DISTRACTOR_HUE_GAP = 45.0  # a distractor's hue is at least this far (degrees) from the item's
MAX_DISTRACTORS = 3  # the other three cells of the 2 x 2 layout
CUE_REVIEWS = (
    "love the {colour} {shape}", "the {colour} {shape} looks great on my shelf",
    "my kid wanted a {colour} {shape} and this is it", "such a nice {colour} {shape}",
    "the {colour} {shape} is exactly as pictured", "bought it for the {colour} {shape}",
)
DISTRACTOR_REVIEWS = (
    "the {colour} {shape} beside it is nice too", "did not expect the {colour} {shape} in the photo",
    "the {colour} {shape} in the picture is not included",
)
FILLER_REVIEWS = (
    "arrived quickly and well packed", "good value for the price", "a gift for my sister, she was happy",
    "shipping took a week", "works as described", "would order from this seller again",
    "the box was a bit damaged", "fine quality for everyday use",
)


@dataclass
class Params:
    users: int = 1000
    items: int = 1000
    shapes: int = 3
    textures: int = 3
    categories: int = 4
    min_len: int = 5
    max_len: int = 15
    noise: float = 0.1
    hue_width: float = 12.0
    pixel_noise: float = 8.0
    image_size: int = 64
    text_dim: int = 32
    seed: int = 0
    distractors: int = 0
    reviews: float = 0.0
    review_filler: float = 0.3
    review_distractor: float = 0.2

    def check(self) -> None:
        limits = {"shapes": len(SHAPES), "textures": len(TEXTURES), "categories": len(CATEGORIES)}
        for key, limit in limits.items():
            if not 1 <= getattr(self, key) <= limit:
                raise ValueError(f"--{key} must be between 1 and {limit}")
        if self.users < 1 or self.items < 10 * self.shapes:
            raise ValueError("need at least one user and at least 10 items per shape (--items >= 10 x --shapes)")
        if not 3 <= self.min_len <= self.max_len <= self.items:
            raise ValueError("need 3 <= --min-len <= --max-len <= --items")
        if not 0.0 <= self.noise <= 1.0 or self.pixel_noise < 0 or self.image_size < 16 or self.text_dim < 1:
            raise ValueError("need 0 <= --noise <= 1, --pixel-noise >= 0, --image-size >= 16, --text-dim >= 1")
        if self.hue_width <= 0:
            raise ValueError("need --hue-width > 0")
        if not 0 <= self.distractors <= MAX_DISTRACTORS:
            raise ValueError(f"--distractors must be between 0 and {MAX_DISTRACTORS}")
        if self.distractors and self.shapes < 2:
            raise ValueError("--distractors needs --shapes >= 2 (a distractor has another shape than the item)")
        if not (0 <= self.reviews <= 1 and 0 <= self.review_filler and 0 <= self.review_distractor
                and self.review_filler + self.review_distractor <= 1):
            raise ValueError("need 0 <= --reviews <= 1 and --review-filler, --review-distractor >= 0 summing to <= 1")


# ----------------------------------------------------------------------------- drawing
def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a shape of 'radius' r centred at (cx, cy), rotated by angle (radians)."""
    if shape == "square":
        points = [(np.cos(a), np.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
        points = [(x * np.sqrt(2) * 0.8, y * np.sqrt(2) * 0.8) for x, y in points]
    elif shape == "triangle":
        points = [(np.cos(a), np.sin(a)) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif shape == "cross":
        w = 0.33
        points = [
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)
        ]
    elif shape == "star":
        points = [
            ((1.0 if k % 2 == 0 else 0.45) * np.cos(a), (1.0 if k % 2 == 0 else 0.45) * np.sin(a))
            for k, a in enumerate(-np.pi / 2 + np.arange(10) * np.pi / 5)
        ]
    else:
        raise ValueError(shape)
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def hue_colour(hue: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated RGB colour of the given hue (degrees), saturation and brightness jittered."""
    red, green, blue = colorsys.hsv_to_rgb((hue % 360) / 360, rng.uniform(0.7, 0.9), rng.uniform(0.75, 0.95))
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_item(
    colour: tuple[int, int, int], shape: str, texture: str, size: int, rng: np.random.Generator, pixel_noise: float
) -> Image.Image:
    """One item image: tinted background, jittered shape in the colour, texture, pixel noise."""
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    r = size * rng.uniform(0.28, 0.40)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    angle = rng.uniform(-np.pi / 8, np.pi / 8)
    mask = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(mask)
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        pen.polygon(shape_polygon(shape, cx, cy, r, angle), fill=255)
    fill = tuple(int(c) for c in colour)
    layer = Image.new("RGB", (size, size), fill)
    dark = tuple(int(c * 0.55) for c in fill)
    tex = ImageDraw.Draw(layer)
    step = max(4, size // int(rng.integers(6, 10)))
    offset = int(rng.integers(0, step))
    if texture == "stripes":
        for x in range(-size + offset, 2 * size, step):
            tex.line([(x, 0), (x + size, size)], fill=dark, width=max(1, step // 3))
    elif texture == "dots":
        for x in range(offset, size, step):
            for y in range(offset, size, step):
                tex.ellipse([x - step / 5, y - step / 5, x + step / 5, y + step / 5], fill=dark)
    elif texture == "checks":
        for x in range(offset - step, size, step):
            for y in range(offset - step, size, step):
                if ((x - offset) // step + (y - offset) // step) % 2 == 0:
                    tex.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    image.paste(layer, (0, 0), mask)
    return add_pixel_noise(image, rng, pixel_noise)


def add_pixel_noise(image: Image.Image, rng: np.random.Generator, pixel_noise: float) -> Image.Image:
    """The image plus Gaussian noise of std ``pixel_noise`` (0-255 scale), rounded and clipped; as is for 0."""
    if pixel_noise <= 0:
        return image
    width, height = image.size
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, pixel_noise, (height, width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


Look = tuple[float, str, str]  # hue (degrees), shape, texture


def colour_name(hue: float) -> str:
    """The name in :data:`COLOURS` nearest to ``hue`` on the colour wheel: how a review or caption says it."""
    return min(COLOURS, key=lambda named: abs((hue - named[1] + 180.0) % 360.0 - 180.0))[0]


def distractor_looks(item: Look, count: int, shapes: list[str], textures: list[str],
                     rng: np.random.Generator) -> list[Look]:
    """``count`` distractors for an item: each another of ``shapes`` and a hue at least
    :data:`DISTRACTOR_HUE_GAP` degrees from the item's, so none shares the cue users look for."""
    hue, shape, _ = item
    others = [s for s in shapes if s != shape]
    looks = []
    for _ in range(count):
        other_hue = (hue + rng.uniform(DISTRACTOR_HUE_GAP, 360.0 - DISTRACTOR_HUE_GAP)) % 360.0
        looks.append((other_hue, others[int(rng.integers(len(others)))], textures[int(rng.integers(len(textures)))]))
    return looks


def draw_scene(item: Look, distractors: list[Look], size: int, rng: np.random.Generator,
               pixel_noise: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A cluttered item image and the item's region: a 2 x 2 layout on a tinted background, the item's
    object in a random cell and each distractor in another (as :func:`draw_item` draws them, at half
    size), pixel noise over all. The region is the item cell's box ``(x0, y0, x1, y1)``, end exclusive."""
    half = size // 2
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 256, 3)))
    cells = [int(c) for c in rng.permutation(4)[: 1 + len(distractors)]]
    for cell, (hue, shape, texture) in zip(cells, [item, *distractors]):
        drawn = draw_item(hue_colour(hue, rng), shape, texture, half, rng, pixel_noise=0.0)
        image.paste(drawn, ((cell % 2) * half, (cell // 2) * half))
    x0, y0 = (cells[0] % 2) * half, (cells[0] // 2) * half
    return add_pixel_noise(image, rng, pixel_noise), (x0, y0, x0 + half, y0 + half)


def write_review(item: Look, distractors: list[Look], params: Params, rng: np.random.Generator) -> str:
    """One review of an item: filler (``review_filler``), a distractor's colour and shape
    (``review_distractor``; filler when there is none), else the item's own colour and shape."""
    draw = rng.random()
    if draw < params.review_filler or (draw < params.review_filler + params.review_distractor and not distractors):
        return FILLER_REVIEWS[int(rng.integers(len(FILLER_REVIEWS)))]
    if draw < params.review_filler + params.review_distractor:
        named, templates = distractors[int(rng.integers(len(distractors)))], DISTRACTOR_REVIEWS
    else:
        named, templates = item, CUE_REVIEWS
    template = templates[int(rng.integers(len(templates)))]
    return template.format(colour=colour_name(named[0]), shape=named[1])


def training_reviews(sequences: list[list[int]], tokens: list[str], looks: list[Look], distractors: list[list[Look]],
                     params: Params) -> list[str]:
    """``item_id<TAB>review`` lines for the training interactions only (a user's last two are the
    validation and test targets under leave-one-out), each reviewed with probability ``params.reviews``."""
    rng = np.random.default_rng([params.seed, 5])
    lines = []
    for sequence in sequences:
        for item in sequence[:-2]:
            if rng.random() < params.reviews:
                lines.append(f"{tokens[item]}\t{write_review(looks[item], distractors[item], params, rng)}")
    return lines


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- descriptor
def _unit(block: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(block)
    return block / norm if norm > 0 else block


def image_descriptor(image: Image.Image) -> np.ndarray:
    """A simple offline descriptor of an RGB image, from its pixels only (176-d, unit length).

    Five blocks, each L2-normalised, then concatenated and L2-normalised again:

    1. hue histogram (16 bins) x saturation (2 levels: 0.25-0.6, > 0.6), each pixel weighted by
       saturation x value, so grey-ish background pixels count little (32);
    2. joint RGB histogram, 4 levels per channel, pixel fractions (64);
    3. the gray image averaged down to 8 x 8, minus its mean (64);
    4. gradient orientation histogram (8 bins over 0-180 degrees, Sobel-like central
       differences on the gray image, weighted by gradient magnitude) (8);
    5. radial profile of the 'object' (pixels with saturation > 0.25): the object's share of
       8 rings around its centroid, radii scaled by the object's own size (8).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64) / 255.0
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]

    hue_bin = np.minimum((hue * 16).astype(int), 15)
    level = np.where(sat > 0.6, 1, 0)
    weight = np.where(sat > 0.25, sat * val, 0.0)
    hue_hist = np.bincount((hue_bin * 2 + level).ravel(), weights=weight.ravel(), minlength=32)

    quant = np.minimum((rgb * 4).astype(int), 3)
    rgb_hist = np.bincount((quant[..., 0] * 16 + quant[..., 1] * 4 + quant[..., 2]).ravel(), minlength=64).astype(float)

    gray = rgb @ np.array([0.299, 0.587, 0.114])
    h, w = gray.shape
    small = gray[: h // 8 * 8, : w // 8 * 8].reshape(8, h // 8, 8, w // 8).mean(axis=(1, 3))
    small = (small - small.mean()).ravel()

    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    gy[1:-1, :] = gray[2:, :] - gray[:-2, :]
    magnitude = np.hypot(gx, gy)
    orientation = np.mod(np.arctan2(gy, gx), np.pi)
    orient_hist = np.bincount(
        np.minimum((orientation / np.pi * 8).astype(int), 7).ravel(), weights=magnitude.ravel(), minlength=8
    )

    mask = sat > 0.25
    radial = np.zeros(8)
    if mask.sum() > 0:
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        scale = np.sqrt(mask.sum() / np.pi)  # radius of a disc of the same area
        yy, xx = np.mgrid[0:h, 0:w]
        rings = np.minimum((np.hypot(yy - cy, xx - cx) / (scale * 1.6) * 8).astype(int), 7)
        inside = np.bincount(rings[mask], minlength=8)
        total = np.bincount(rings.ravel(), minlength=8)
        radial = inside / np.maximum(total, 1)

    blocks = [hue_hist, rgb_hist, small, orient_hist, radial]
    return _unit(np.concatenate([_unit(b) for b in blocks])).astype(np.float32)


# ----------------------------------------------------------------------------- generation
def generate(params: Params, out: Path, name: str) -> dict:
    params.check()
    start = time.perf_counter()
    rng = np.random.default_rng(params.seed)
    shapes = list(SHAPES)[: params.shapes]
    textures = list(TEXTURES)[: params.textures]
    categories = list(CATEGORIES)[: params.categories]

    hue = rng.uniform(0.0, 360.0, params.items)
    shape = rng.integers(0, params.shapes, params.items)
    texture = rng.integers(0, params.textures, params.items)
    category = rng.integers(0, params.categories, params.items)
    width = len(str(params.items - 1))
    tokens = [f"item{i:0{width}d}" for i in range(params.items)]

    user_rng = np.random.default_rng([params.seed, 3])
    width_u = len(str(params.users - 1))
    sequences, user_tastes = [], []
    everything = np.ones(params.items)
    for u in progress(range(params.users), "draw users", unit="users"):
        taste_hue, taste_shape = float(user_rng.uniform(0.0, 360.0)), int(user_rng.integers(params.shapes))
        distance = np.abs((hue - taste_hue + 180.0) % 360.0 - 180.0)
        liking = np.exp(-0.5 * (distance / params.hue_width) ** 2) * (shape == taste_shape)
        length = int(user_rng.integers(params.min_len, params.max_len + 1))
        seen: list[int] = []
        for _ in range(length):
            weight = (liking if user_rng.random() >= params.noise else everything).copy()
            weight[seen] = 0.0
            if weight.sum() <= 1e-12:  # the taste is used up: any unseen item
                weight = everything.copy()
                weight[seen] = 0.0
            seen.append(int(user_rng.choice(params.items, p=weight / weight.sum())))
        sequences.append(seen)
        user_tastes.append(f"user{u:0{width_u}d}\t{taste_hue:.1f}\t{shapes[taste_shape]}")
    used = sorted({i for seq in sequences for i in seq})  # items no user chose are left out
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    looks = [(float(hue[i]), shapes[shape[i]], textures[texture[i]]) for i in range(params.items)]
    distractors = [
        distractor_looks(looks[i], params.distractors, shapes, textures, np.random.default_rng([params.seed, 4, i]))
        if params.distractors else [] for i in range(params.items)
    ]
    descriptors, regions = [], []
    for i in progress(used, "draw items", unit="images"):
        image_rng = np.random.default_rng([params.seed, 1, i])
        if params.distractors:
            image, (x0, y0, x1, y1) = draw_scene(looks[i], distractors[i], params.image_size, image_rng,
                                                 params.pixel_noise)
            named = ";".join(f"{colour_name(h)} {s}" for h, s, _ in distractors[i])
            regions.append(f"{tokens[i]}\t{x0}\t{y0}\t{x1}\t{y1}\t{params.image_size}\t{params.image_size}\t{named}")
        else:
            colour = hue_colour(hue[i], image_rng)
            image = draw_item(
                colour, shapes[shape[i]], textures[texture[i]], params.image_size, image_rng, params.pixel_noise
            )
        path = out / "images" / f"{tokens[i]}.png"
        atomic_write_bytes(path, png_bytes(image))
        with Image.open(path) as stored:  # the descriptor sees only what is on disk
            descriptors.append(image_descriptor(stored))
    used_tokens = [tokens[i] for i in used]
    for stale in sorted((out / "images").glob("item*.png")):  # left by an earlier run with other flags
        if stale.stem not in set(used_tokens):
            stale.unlink()
    write_item_features(out, name, "image", used_tokens, np.stack(descriptors))

    category_vectors = np.random.default_rng([params.seed, 2]).normal(size=(params.categories, params.text_dim))
    category_vectors /= np.linalg.norm(category_vectors, axis=1, keepdims=True)
    write_item_features(out, name, "text", used_tokens, category_vectors[category[used]])

    n_rows = write_inter(
        out / f"{name}.inter",
        ((f"user{u:0{width_u}d}", [(tokens[i], p) for p, i in enumerate(seq)]) for u, seq in enumerate(sequences)),
    )

    write_item_table(
        out / f"{name}.item",
        ([tokens[i], categories[category[i]], f"synthetic > {categories[category[i]]}", "", ""] for i in used),
    )
    atomic_write_text(
        out / f"{name}.images.tsv",
        "\n".join(["item_id\timage_urls", *(f"{t}\timages/{t}.png" for t in used_tokens)]) + "\n",
    )
    truth = [
        f"{tokens[i]}\t{hue[i]:.1f}\t{shapes[shape[i]]}\t{textures[texture[i]]}\t{categories[category[i]]}"
        for i in used
    ]
    atomic_write_text(out / f"{name}.truth.tsv", "\n".join(["item_id\thue\tshape\ttexture\tcategory", *truth]) + "\n")
    atomic_write_text(out / f"{name}.user_tastes.tsv", "\n".join(["user_id\thue\tshape", *user_tastes]) + "\n")
    for suffix, lines, header in (
        ("regions.tsv", regions, "item_id\tx0\ty0\tx1\ty1\twidth\theight\tdistractors"),
        ("reviews", training_reviews(sequences, tokens, looks, distractors, params) if params.reviews else [],
         "item_id\treview"),
    ):
        if lines:
            atomic_write_text(out / f"{name}.{suffix}", "\n".join([header, *lines]) + "\n")
        else:  # none asked for: a file left by an earlier run with other flags would mislead
            (out / f"{name}.{suffix}").unlink(missing_ok=True)

    result = {"users": params.users, "items": len(used), "interactions": n_rows,
              "seconds": time.perf_counter() - start, "params": asdict(params)}
    print(summary(out, name, params.users, len(used), n_rows, f"{result['seconds']:.1f} s"))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Params()
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: dataset/<name>)")
    parser.add_argument("--name", default="synthetic", help="dataset name (default: synthetic)")
    helps = {
        "users": "number of users", "items": "number of items",
        "shapes": f"shapes used (max {len(SHAPES)})", "textures": f"textures used (max {len(TEXTURES)})",
        "categories": f"coarse text categories (max {len(CATEGORIES)})", "min_len": "shortest user sequence",
        "max_len": "longest user sequence", "noise": "probability that an interaction ignores the user's taste",
        "hue_width": "how far (degrees, one std) from the favourite hue a user's choices spread",
        "pixel_noise": "std of Gaussian pixel noise (0-255 scale)", "image_size": "image side in pixels",
        "text_dim": "dimension of the category text feature", "seed": "random seed (same seed, same bytes)",
        "distractors": f"distractor objects per image, 0-{MAX_DISTRACTORS} (0: one object per image)",
        "reviews": "probability that a training interaction gets a review in <name>.reviews (0: no file)",
        "review_filler": "share of reviews that say nothing about the look",
        "review_distractor": "share of reviews that name a distractor's colour and shape",
    }
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                            help=f"{helps[key]} (default {value})")
    args = vars(parser.parse_args(argv))
    out, name = args.pop("out"), args.pop("name")
    try:
        return generate(Params(**args), out or Path("dataset") / name, name)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
