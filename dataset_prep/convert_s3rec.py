"""Convert the S3-Rec sequence files (Amazon 2014 5-core Sports / Beauty / Toys) into a RecBole dataset.

Input (``--src``, a folder):

* ``<Category>.txt`` (S3-Rec, RUCAIBox/CIKM2020-S3Rec): one line per user,
  ``user_id item_id item_id ...``, integer ids from 1, items in chronological order;
* a datamaps file mapping the integer ids to Amazon reviewer ids and ASINs, where one exists:
  ``datamaps.json`` (``id2user``/``id2item`` and/or ``user2id``/``item2id``) numbered like
  ``<Category>.txt``; or ``datamaps_<tag>.json`` (e.g. ``datamaps_p5ids.json``) numbered like
  ``sequential_<tag>.txt``, the same data in another integer numbering (P5). In that case the
  two numberings are aligned first: items are matched through users whose sequence of item
  popularities is unique, refined until every item is matched, and the alignment is accepted
  only if it maps every S3-Rec sequence exactly onto a P5 sequence;
* ``user_sequence.txt`` (optional, ``reviewerID ASIN ASIN ...``): when present, every mapped
  sequence is checked against it.

Output (``--out``): ``<name>.inter`` (``user_id:token item_id:token timestamp:float``) keyed by
reviewer ids and ASINs (the S3-Rec integer ids when no datamaps exist, or with ``--ids numeric``),
users in the S3-Rec file's order.

Timestamps: the S3-Rec files have none. The timestamp of an interaction is its position in the
user's sequence (0, 1, 2, ...), so RecBole's leave-one-out split with ``order: TO`` (the
project's ``properties/overall.yaml``) takes the last item as the test target and the second
to last as the validation target, as S3-Rec, P5 and the papers that report on these sets do.

Published sizes (checked on the real files): Sports 35,598 users, 18,357 items, 296,337
interactions; Beauty 22,363 / 12,101 / 198,502; Toys 19,412 / 11,924 / 167,597.

The files are public in https://github.com/RUCAIBox/CIKM2020-S3Rec, folder ``data/``
(``Sports_and_Outdoors.txt``, ``Beauty.txt``, ``Toys_and_Games.txt``; no datamaps there, so the ids
stay the S3-Rec integers). Usage::

    curl -fL --create-dirs -o raw/s3rec_sports/Sports_and_Outdoors.txt \
        https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data/Sports_and_Outdoors.txt
    python dataset_prep/convert_s3rec.py --src raw/s3rec_sports --name sports
    python dataset_prep/convert_s3rec.py --src raw/s3rec_beauty --name beauty   # Beauty.txt
    python dataset_prep/convert_s3rec.py --src raw/s3rec_toys --name toys       # Toys_and_Games.txt

(``--out`` defaults to ``dataset/<name>``.) For text and images too, ``run_reveal.py --dataset=sports``
prepares the set from the raw Amazon files (README "Datasets").
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from dataset_prep.common import progress, summary, write_inter

Sequences = dict[str, list[str]]


class S3RecFormatError(ValueError):
    """Input files that are missing, malformed or inconsistent with each other."""


# ----------------------------------------------------------------------------- reading
def read_sequences(path: Path) -> Sequences:
    """``user item item ...`` lines -> {user: [items]} in file order (blank lines skipped)."""
    sequences: Sequences = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(progress(handle, f"read {path.name}", unit="users"), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise S3RecFormatError(f"{path}:{number}: user {parts[0]} has no items")
            if parts[0] in sequences:
                raise S3RecFormatError(f"{path}:{number}: user {parts[0]} appears twice")
            sequences[parts[0]] = parts[1:]
    if not sequences:
        raise S3RecFormatError(f"{path}: no sequences")
    return sequences


def read_datamaps(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(id -> reviewer id, id -> ASIN) from either datamaps layout; ids as strings."""
    data = json.loads(path.read_text(encoding="utf-8"))
    maps = []
    for kind in ("user", "item"):
        forward = {str(k): str(v) for k, v in (data.get(f"id2{kind}") or {}).items()}
        inverse = {str(v): str(k) for k, v in (data.get(f"{kind}2id") or {}).items()}
        if forward and inverse and forward != inverse:
            raise S3RecFormatError(f"{path}: id2{kind} and {kind}2id disagree")
        mapping = forward or inverse
        if not mapping:
            raise S3RecFormatError(f"{path}: neither id2{kind} nor {kind}2id")
        if len(set(mapping.values())) != len(mapping):
            raise S3RecFormatError(f"{path}: id2{kind} maps two ids to the same {kind}")
        maps.append(mapping)
    return maps[0], maps[1]


def read_user_sequences(path: Path) -> Sequences:
    """GRAM's ``reviewerID ASIN ASIN ...`` file."""
    return read_sequences(path)


# ----------------------------------------------------------------------------- locating files
def find_s3rec_file(src: Path) -> Path:
    candidates = sorted(
        p for p in src.glob("*.txt") if p.name != "user_sequence.txt" and not p.name.startswith("sequential")
    )
    if len(candidates) > 1:  # e.g. item_keywords_idgenrec.txt too: S3-Rec ships <Category>_item2attributes.json
        with_attributes = [p for p in candidates if (src / f"{p.stem}_item2attributes.json").is_file()]
        candidates = with_attributes or candidates
    if len(candidates) != 1:
        raise S3RecFormatError(
            f"{src}: expected exactly one S3-Rec <Category>.txt, found {[p.name for p in candidates]}; "
            "name it with --sequences"
        )
    return candidates[0]


def find_datamaps(src: Path, s3rec_file: Path) -> tuple[Path, Path] | None:
    """(datamaps file, the sequence file numbered like it), or None when the folder has none."""
    plain = src / "datamaps.json"
    found = [plain] if plain.is_file() else sorted(src.glob("datamaps*.json"))
    if not found:
        return None
    if len(found) > 1:
        raise S3RecFormatError(f"{src}: several datamaps files {[p.name for p in found]}; name one with --datamaps")
    return found[0], paired_sequence_file(found[0], s3rec_file)


def paired_sequence_file(datamaps: Path, s3rec_file: Path) -> Path:
    """``datamaps<tag>.json`` pairs with ``sequential<tag>.txt`` when that exists, else with the S3-Rec file."""
    tag = re.fullmatch(r"datamaps(.*)\.json", datamaps.name)
    if tag:
        sibling = datamaps.with_name(f"sequential{tag.group(1)}.txt")
        if sibling.is_file():
            return sibling
    return s3rec_file


# ----------------------------------------------------------------------------- aligning two numberings
def align_numberings(a: Sequences, b: Sequences) -> tuple[dict[str, str], dict[str, str]]:
    """Item and user maps from numbering ``a`` to numbering ``b`` of the same sequences.

    Colour refinement (1-dimensional Weisfeiler-Leman) on both sides at once: an item starts
    labelled by its popularity; a user's label is the sequence of its items' labels; an
    item's next label adds the sorted list of (user label, position) of its occurrences. After
    the labels stop splitting further, each label held by exactly one item on each side matches
    those two items. Matched items are then fixed to their own label and the refinement runs
    again, until every item is matched. Users are finally matched by their fully mapped
    sequences. Raises S3RecFormatError when the two are not the same data, or when some items
    cannot be told apart (then no ASIN can be assigned to them with certainty).
    """
    if len(a) != len(b):
        raise S3RecFormatError(f"cannot align: {len(a)} users against {len(b)}")
    freq_a = Counter(i for seq in a.values() for i in seq)
    freq_b = Counter(i for seq in b.values() for i in seq)
    if len(freq_a) != len(freq_b) or sorted(freq_a.values()) != sorted(freq_b.values()):
        raise S3RecFormatError("cannot align: the item popularity distributions differ")
    item_map: dict[str, str] = {}
    while len(item_map) < len(freq_a):
        image = {y: x for x, y in item_map.items()}
        label_a = {i: ("m", i) if i in item_map else ("f", f) for i, f in freq_a.items()}
        label_b = {i: ("m", image[i]) if i in image else ("f", f) for i, f in freq_b.items()}
        sides = [(a, label_a), (b, label_b)]
        classes = len(set(label_a.values()) | set(label_b.values()))
        while True:
            intern: dict = {}
            refined = []
            for seqs, labels in sides:
                contexts = defaultdict(list)
                for seq in seqs.values():
                    user_label = intern.setdefault(tuple(labels[i] for i in seq), len(intern))
                    for position, item in enumerate(seq):
                        contexts[item].append((user_label, position))
                refined.append({i: (labels[i], tuple(sorted(contexts[i]))) for i in labels})
            names: dict = {}
            sides = [
                (seqs, {i: names.setdefault(label, len(names)) for i, label in new.items()})
                for (seqs, _), new in zip(sides, refined)
            ]
            if len(names) == classes:
                break
            classes = len(names)
        holders = defaultdict(lambda: ([], []))
        for side, (_, labels) in enumerate(sides):
            for item, label in labels.items():
                holders[label][side].append(item)
        before = len(item_map)
        for items_a, items_b in holders.values():
            if len(items_a) != len(items_b):
                raise S3RecFormatError("cannot align: the two files hold different sequences")
            if len(items_a) == 1:
                item_map[items_a[0]] = items_b[0]
        if len(item_map) == before:
            raise S3RecFormatError(
                f"cannot align: {len(freq_a) - len(item_map)} items cannot be told apart from others"
            )
    by_sequence = defaultdict(list)
    for user, seq in b.items():
        by_sequence[tuple(seq)].append(user)
    user_map = {}
    for user, seq in a.items():
        candidates = by_sequence.get(tuple(item_map[i] for i in seq))
        if not candidates:
            raise S3RecFormatError(f"cannot align: user {user}'s mapped sequence is not in the other file")
        user_map[user] = candidates.pop(0)  # users with identical sequences are interchangeable
    return item_map, user_map


# ----------------------------------------------------------------------------- conversion
def token_maps(
    sequences: Sequences, datamaps: Path, paired: Path, s3rec_file: Path
) -> tuple[dict[str, str], dict[str, str], str]:
    """S3-Rec id -> reviewer id and S3-Rec id -> ASIN, and how they were obtained."""
    id2user, id2item = read_datamaps(datamaps)
    how = f"{datamaps.name}"
    if paired != s3rec_file:
        other = read_sequences(paired)
        item_map, user_map = align_numberings(sequences, other)
        id2user = {u: id2user[v] for u, v in user_map.items() if v in id2user}
        id2item = {i: id2item[j] for i, j in item_map.items() if j in id2item}
        how += f" via {paired.name}, aligned to {s3rec_file.name}"
    missing_users = [u for u in sequences if u not in id2user]
    missing_items = sorted({i for seq in sequences.values() for i in seq if i not in id2item}, key=int)
    if missing_users or missing_items:
        raise S3RecFormatError(
            f"{datamaps}: no token for {len(missing_users)} users (e.g. {missing_users[:3]}) and "
            f"{len(missing_items)} items (e.g. {missing_items[:3]}) of {s3rec_file.name}; "
            "it may belong to another numbering (use --ids numeric to keep the integer ids)"
        )
    return id2user, id2item, how


def check_user_sequences(mapped: Sequences, path: Path) -> None:
    """Every mapped sequence must equal the reviewer's line in ``user_sequence.txt``."""
    reference = read_user_sequences(path)
    if set(reference) != set(mapped):
        raise S3RecFormatError(f"{path}: its {len(reference)} users differ from the {len(mapped)} mapped users")
    bad = [u for u, seq in mapped.items() if reference[u] != seq]
    if bad:
        raise S3RecFormatError(f"{path}: {len(bad)} mapped sequences differ from it, e.g. user {bad[0]}")


def convert(
    src: Path,
    out: Path,
    name: str,
    sequences_file: Path | None = None,
    datamaps: Path | None = None,
    ids: str = "auto",
) -> dict:
    """Write ``<out>/<name>.inter``; returns counts and how the tokens were obtained."""
    start = time.perf_counter()
    s3rec_file = sequences_file or find_s3rec_file(src)
    sequences = read_sequences(s3rec_file)
    found = None
    if ids != "numeric":
        found = (datamaps, paired_sequence_file(datamaps, s3rec_file)) if datamaps else find_datamaps(src, s3rec_file)
        if found is None and ids == "asin":
            raise S3RecFormatError(f"{src}: no datamaps*.json, so no ASINs (use --ids numeric)")
    if found is None:
        id2user = {u: u for u in sequences}
        id2item = {i: i for seq in sequences.values() for i in seq}
        how = "S3-Rec integer ids (no datamaps)" if ids != "numeric" else "S3-Rec integer ids (--ids numeric)"
    else:
        id2user, id2item, how = token_maps(sequences, *found, s3rec_file)
    mapped = {id2user[u]: [id2item[i] for i in seq] for u, seq in sequences.items()}
    if len(mapped) != len(sequences):
        raise S3RecFormatError("two S3-Rec users map to the same reviewer id")
    reference = (src / "user_sequence.txt") if src else None
    checked = found is not None and reference is not None and reference.is_file()
    if checked:
        check_user_sequences(mapped, reference)
        how += f", checked against {reference.name}"
    out.mkdir(parents=True, exist_ok=True)
    rows = write_inter(
        out / f"{name}.inter",
        ((user, [(item, position) for position, item in enumerate(seq)]) for user, seq in mapped.items()),
    )
    n_items = len({i for seq in mapped.values() for i in seq})
    result = {
        "users": len(mapped),
        "items": n_items,
        "interactions": rows,
        "tokens": how,
        "seconds": time.perf_counter() - start,
    }
    print(summary(out, name, len(mapped), n_items, rows, f"tokens: {how}; {result['seconds']:.1f} s"))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder holding <Category>.txt (and datamaps*.json)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: dataset/<name>)")
    parser.add_argument("--name", required=True, help="dataset name: the output files are <name>.inter etc.")
    parser.add_argument("--sequences", type=Path, default=None,
                        help="the S3-Rec sequence file (default: found in --src)")
    parser.add_argument("--datamaps", type=Path, default=None, help="the datamaps json (default: found in --src)")
    parser.add_argument(
        "--ids", choices=("auto", "asin", "numeric"), default="auto",
        help="auto: ASINs/reviewer ids where a datamaps file exists, else integer ids; "
        "asin: fail without datamaps; numeric: always the S3-Rec integer ids",
    )
    args = parser.parse_args(argv)
    try:
        return convert(
            args.src, args.out or Path("dataset") / args.name, args.name, args.sequences, args.datamaps, args.ids
        )
    except (S3RecFormatError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
