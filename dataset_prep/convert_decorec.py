"""Convert the DeCoRec/MISSRec "Scientific" benchmark files into a reveal-recbole dataset.

Input (``--src``): ``Scientific.{train,valid,test}.inter``, ``Scientific.text``,
``Scientific.item2index``, ``Scientific.feat1CLS`` (text) and ``Scientific.feat3CLS`` (image),
optionally ``text_collisiongenrec/Scientific.item.json`` for product descriptions.

Output (``--out``), all keyed by the item's ASIN, never by row order:

* ``<name>.inter``  user_id:token, item_id:token, timestamp:float. The source has no
  timestamps; each user's full sequence is the test row's history plus its target, and the
  timestamp is the position in that sequence (0, 1, ...), so RecBole's leave-one-out split
  with ``order: TO`` reproduces the source's valid/test targets exactly.
* ``<name>.item``   item_id, title, categories, brand, description (TSV, read by our own code).
* ``<name>.image.npy`` / ``<name>.image.items`` and ``<name>.text.npy`` / ``<name>.text.items``.

Usage::

    python dataset_prep/convert_decorec.py --src ../shared/data/amazon_scientific_mm_decorec \
        --out reveal_recbole/dataset_example/scientific --name scientific
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reveal_recbole.data.features import write_item_features  # noqa: E402
from reveal_recbole.utils import atomic_write_text  # noqa: E402

FEATURE_FILES = {"text": "feat1CLS", "image": "feat3CLS"}
TEXT_PATTERN = re.compile(r"^(?P<title>.*?)\. (?P<categories>(?:Industrial & Scientific[^.]*)?)\. (?P<brand>.*?)\.\s*$")


def read_index(path: Path) -> dict[str, int]:
    pairs = (line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line)
    return {token: int(index) for token, index in pairs}


def read_sequences(src: Path, prefix: str) -> dict[str, list[str]]:
    """Full chronological sequence per user index: the test history plus the test target."""
    sequences = {}
    lines = (src / f"{prefix}.test.inter").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        user, history, target = line.split("\t")
        sequences[user] = history.split(" ") + [target]
    for line in (src / f"{prefix}.valid.inter").read_text(encoding="utf-8").splitlines()[1:]:
        user, history, target = line.split("\t")
        if sequences[user][:-1] != history.split(" ") + [target]:
            raise ValueError(f"valid row of user {user} is not the prefix of its test row")
    return sequences


def parse_item_text(text: str) -> dict[str, str]:
    """Split DeCoRec's 'title. category path. brand.' text into its fields."""
    match = TEXT_PATTERN.match(text.strip())
    if match is None:
        raise ValueError(f"cannot parse item text {text!r}")
    return {key: value.strip() for key, value in match.groupdict().items()}


def normalise_title(title: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", title.lower()).strip()


def descriptions_by_title(item_json: Path, items: dict[str, dict[str, str]]) -> dict[str, str]:
    """Join CollisionGenRec descriptions by normalised title, using brand to break ties."""
    records: dict[str, list[dict]] = {}
    for record in json.loads(item_json.read_text(encoding="utf-8")).values():
        records.setdefault(normalise_title(record["title"]), []).append(record)
    joined = {}
    for asin, fields in items.items():
        candidates = records.get(normalise_title(fields["title"]), [])
        if len(candidates) > 1:
            candidates = [r for r in candidates if r.get("brand", "").strip() == fields["brand"]] or candidates
        descriptions = {c.get("description", "").strip() for c in candidates}
        if len(descriptions) == 1:
            joined[asin] = descriptions.pop()
    return joined


def clean_field(value: str) -> str:
    return " ".join(value.replace("\t", " ").split())


def convert(src: Path, out: Path, name: str, prefix: str = "Scientific") -> None:
    out.mkdir(parents=True, exist_ok=True)
    item_index = read_index(src / f"{prefix}.item2index")
    user_index = read_index(src / f"{prefix}.user2index")
    index_to_item = {index: token for token, index in item_index.items()}
    index_to_user = {index: token for token, index in user_index.items()}

    sequences = read_sequences(src, prefix)
    inter_lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in sorted(sequences, key=int):
        for position, item in enumerate(sequences[user]):
            inter_lines.append(f"{index_to_user[int(user)]}\t{index_to_item[int(item)]}\t{position}")
    atomic_write_text(out / f"{name}.inter", "\n".join(inter_lines) + "\n")

    items = {}
    for line in (src / f"{prefix}.text").read_text(encoding="utf-8").splitlines()[1:]:
        asin, text = line.split("\t", 1)
        items[asin] = parse_item_text(text)
    item_json = src / "text_collisiongenrec" / f"{prefix}.item.json"
    descriptions = descriptions_by_title(item_json, items) if item_json.exists() else {}
    item_lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token\tdescription:token_seq"]
    for asin in sorted(items, key=lambda a: item_index[a]):
        fields = items[asin]
        row = [asin, fields["title"], fields["categories"], fields["brand"], descriptions.get(asin, "")]
        item_lines.append("\t".join(clean_field(v) for v in row))
    atomic_write_text(out / f"{name}.item", "\n".join(item_lines) + "\n")

    tokens = [index_to_item[i] for i in range(len(index_to_item))]
    for modality, suffix in FEATURE_FILES.items():
        raw = np.fromfile(src / f"{prefix}.{suffix}", dtype=np.float32)
        if raw.size % len(tokens):
            raise ValueError(f"{prefix}.{suffix}: {raw.size} floats is not a multiple of {len(tokens)} items")
        write_item_features(out, name, modality, tokens, raw.reshape(len(tokens), -1))
    print(
        f"wrote {out}: {len(user_index)} users, {len(item_index)} items, {len(inter_lines) - 1} interactions, "
        f"descriptions for {len(descriptions)} items"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path(os.environ.get("SHARED_DATA", "../shared/data")) / "amazon_scientific_mm_decorec")
    parser.add_argument("--out", type=Path, default=Path("reveal_recbole/dataset_example/scientific"))
    parser.add_argument("--name", default="scientific")
    args = parser.parse_args(argv)
    convert(args.src, args.out, args.name)


if __name__ == "__main__":
    main()
