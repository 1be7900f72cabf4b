"""Convert the DeCoRec/MISSRec "Scientific" benchmark files into the bundled reveal-recbole dataset.

A thin entry point to ``convert_unisrec.py`` (the UniSRec/MISSRec benchmark converter) with the
defaults of the bundled set: ``--out reveal_recbole/dataset_example/scientific``, ``--name scientific``;
MISSRec feature names (``feat1CLS`` = text, ``feat3CLS`` = image) and the descriptions in
``text_collisiongenrec/Scientific.item.json``. See convert_unisrec.py for the input and output formats.

Input (``--src``): the ``Scientific.*`` files of https://github.com/KIKIENAO/decorec, folder
``dataset/downstream/Scientific/``, optionally with ``text_collisiongenrec/Scientific.item.json`` from
https://github.com/Nishikata97/CollisionGenRec (``data/Scientific/Scientific.item.json``) for item
descriptions. Default: ``$SHARED_DATA/amazon_scientific_mm_decorec`` when that variable is set, else
``raw/decorec/dataset/downstream/Scientific`` (where ``git clone`` into ``raw/decorec`` puts them).

Output: ``scientific.inter`` (2,928 users, 1,585 items, 19,712 interactions; timestamp = position
in the user's sequence), ``scientific.item``, ``scientific.{image,text}.{npy,items}`` (512-d).

Usage::

    git clone https://github.com/KIKIENAO/decorec raw/decorec
    python dataset_prep/convert_decorec.py --src raw/decorec/dataset/downstream/Scientific \
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
        src=Path(os.environ["SHARED_DATA"]) / "amazon_scientific_mm_decorec" if os.environ.get("SHARED_DATA")
        else Path("raw/decorec/dataset/downstream/Scientific"),
        out=Path("reveal_recbole/dataset_example/scientific"),
        name="scientific",
        prefix="Scientific",
    )
    return convert_unisrec.main(argv, parser)


if __name__ == "__main__":
    main()
