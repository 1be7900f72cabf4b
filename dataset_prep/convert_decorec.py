"""Convert the DeCoRec/MISSRec "Scientific" benchmark files into the bundled reveal-recbole dataset.

A thin entry point to ``convert_unisrec.py`` (the UniSRec/MISSRec benchmark converter) with the
defaults of the bundled set: ``--src ../shared/data/amazon_scientific_mm_decorec`` (or
``$SHARED_DATA/amazon_scientific_mm_decorec``), ``--out reveal_recbole/dataset_example/scientific``,
``--name scientific``; MISSRec feature names (``feat1CLS`` = text, ``feat3CLS`` = image) and the
descriptions in ``text_collisiongenrec/Scientific.item.json``. See convert_unisrec.py for the
input and output formats.

Output: ``scientific.inter`` (2,928 users, 1,585 items, 19,712 interactions; timestamp = position
in the user's sequence), ``scientific.item``, ``scientific.{image,text}.{npy,items}`` (512-d).

Usage::

    python dataset_prep/convert_decorec.py --src ../shared/data/amazon_scientific_mm_decorec \
        --out reveal_recbole/dataset_example/scientific --name scientific
"""
from __future__ import annotations

import os
from pathlib import Path

from dataset_prep import convert_unisrec


def convert(src: Path, out: Path, name: str, prefix: str = "Scientific") -> dict:
    return convert_unisrec.convert(src, out, name, prefix=prefix)


def main(argv: list[str] | None = None) -> dict:
    parser = convert_unisrec.build_parser(
        __doc__,
        src=Path(os.environ.get("SHARED_DATA", "../shared/data")) / "amazon_scientific_mm_decorec",
        out=Path("reveal_recbole/dataset_example/scientific"),
        name="scientific",
        prefix="Scientific",
    )
    return convert_unisrec.main(argv, parser)


if __name__ == "__main__":
    main()
