"""Convert UniSRec / MISSRec / DeCoRec "benchmark" files into a reveal-recbole dataset.

Input (``--src``, files named ``<prefix>.*``; the prefix is found from ``*.test.inter``):

* ``<prefix>.{train,valid,test}.inter``: ``user_id:token item_id_list:token_seq item_id:token``
  in user and item *indices*. As UniSRec's ``process_amazon.py`` writes them: the train file
  holds one row per target from the second to the third-to-last item, the valid file one row
  per user (its train sequence, the second-to-last item), the test file one row per user (the
  train sequence plus the valid target, the last item); histories are cut to their last 50
  items, so each user's full sequence is rebuilt from the train rows (in file order) and
  checked against the valid and test rows.
* ``<prefix>.item2index`` / ``<prefix>.user2index``: ``token<TAB>index``; without them the
  indices themselves are the tokens.
* ``<prefix>.text``: ``item_id:token text:token_seq`` keyed by ASIN; the text is
  ``title. category path. brand.`` The split is found by anchoring the category path at the
  dataset's root category (``--category-root``; by default the phrase that starts a ". "
  segment in most texts, e.g. "Industrial & Scientific"); a text that does not split that
  way becomes the title alone (counted).
* ``<prefix>.feat*``: raw float32 rows in item-index order, one file per modality. MISSRec's
  names are the default: ``feat1CLS`` = text, ``feat3CLS`` = image (CLIP ViT-B/32); others
  (e.g. UniSRec's 768-d BERT ``feat1CLS`` or word-dropped ``feat2CLS``) are named with
  ``--feature SUFFIX=MODALITY``.
* optionally an LC-Rec/CollisionGenRec ``<prefix>.item.json`` (``--descriptions``; by default
  ``text_collisiongenrec/<prefix>.item.json`` when present): descriptions joined by normalised
  title, brand breaking ties, kept only when the match is unambiguous.

Output (``--out``), all keyed by the item's ASIN, never by row order:

* ``<name>.inter``  user_id:token, item_id:token, timestamp:float. The source has no
  timestamps; the timestamp is the position in the user's sequence (0, 1, ...), so RecBole's
  leave-one-out split with ``order: TO`` reproduces the source's valid/test targets exactly.
* ``<name>.item``   item_id, title, categories, brand, description (TSV).
* ``<name>.<modality>.npy`` / ``<name>.<modality>.items`` per feature file.

Usage::

    python dataset_prep/convert_unisrec.py --src raw/decorec/dataset/downstream/Scientific \
        --out reveal_recbole/dataset_example/scientific --name scientific   # github.com/KIKIENAO/decorec
    python dataset_prep/convert_unisrec.py --src downstream/Office --name office --feature feat1CLS=text
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from dataset_prep.common import summary, write_inter, write_item_table
from reveal_recbole.data.features import write_item_features

MISSREC_FEATURES = {"feat1CLS": "text", "feat3CLS": "image"}


class BenchmarkFormatError(ValueError):
    """Benchmark files that are missing, malformed or inconsistent; the message names the cause."""


# ----------------------------------------------------------------------------- reading
def find_prefix(src: Path) -> str:
    found = sorted(p.name[: -len(".test.inter")] for p in src.glob("*.test.inter"))
    if len(found) != 1:
        raise BenchmarkFormatError(f"{src}: expected one <prefix>.test.inter, found {found}; name it with --prefix")
    return found[0]


def read_index(path: Path) -> dict[str, int]:
    index = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise BenchmarkFormatError(f"{path}:{number}: expected 'token<TAB>index', got {line[:60]!r}")
        index[parts[0]] = int(parts[1])
    if sorted(index.values()) != list(range(len(index))):
        raise BenchmarkFormatError(f"{path}: indices are not 0..{len(index) - 1}, each once")
    return index


def read_rows(path: Path) -> list[tuple[str, list[str], str]]:
    """(user, history, target) rows of a benchmark ``.inter`` file, in file order."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if [h.split(":")[0] for h in header] != ["user_id", "item_id_list", "item_id"]:
            raise BenchmarkFormatError(f"{path}: header {header} is not user_id, item_id_list, item_id")
        for number, line in enumerate(handle, 2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise BenchmarkFormatError(f"{path}:{number}: expected 3 tab-separated fields")
            rows.append((parts[0], parts[1].split(" ") if parts[1] else [], parts[2]))
    return rows


def read_sequences(src: Path, prefix: str) -> dict[str, list[str]]:
    """Each user's full chronological sequence (of item indices), rebuilt and cross-checked."""
    train: dict[str, list[tuple[list[str], str]]] = {}
    for user, history, target in read_rows(src / f"{prefix}.train.inter"):
        train.setdefault(user, []).append((history, target))
    valid = {user: (history, target) for user, history, target in read_rows(src / f"{prefix}.valid.inter")}
    test = {user: (history, target) for user, history, target in read_rows(src / f"{prefix}.test.inter")}
    if set(valid) != set(test):
        raise BenchmarkFormatError(f"{prefix}: the valid and test files hold different users")
    sequences = {}
    for user in test:
        rows = train.get(user, [])
        if rows:
            # rows run from the last train target back to the second item; the last row's history is item 1
            train_seq = list(rows[-1][0]) + [target for _, target in reversed(rows)]
            for position, (history, _) in enumerate(reversed(rows), 1):
                if history != train_seq[:position][-len(history):] or not history:
                    raise BenchmarkFormatError(
                        f"{prefix}.train.inter: user {user}'s rows are not prefixes of one sequence"
                    )
        else:
            train_seq = list(valid[user][0])
        valid_history, valid_target = valid[user]
        test_history, test_target = test[user]
        if not valid_history or valid_history != train_seq[-len(valid_history):]:
            raise BenchmarkFormatError(f"{prefix}.valid.inter: user {user}'s history is not its train sequence")
        full = train_seq + [valid_target]
        if not test_history or test_history != full[-len(test_history):]:
            raise BenchmarkFormatError(
                f"{prefix}.test.inter: user {user}'s history is not its valid history plus target"
            )
        sequences[user] = full + [test_target]
    return sequences


# ----------------------------------------------------------------------------- item text
def detect_category_root(texts: list[str]) -> str | None:
    """The phrase that opens a ". "-separated segment in the most texts (the root category).

    Starts from the most common first word of the segments after the title, then adds words
    while at least 90 % of those texts still share the phrase. None when no word opens a segment
    in at least half of the texts.
    """
    segments = [[s for s in text.strip().split(". ")[1:] if s] for text in texts]
    first = Counter(w for segs in segments for w in {s.split(" ")[0] for s in segs})
    if not first:
        return None
    word, count = first.most_common(1)[0]
    if count < len(texts) / 2:
        return None
    phrase = [word]
    while True:
        longer = Counter()
        for segs in segments:
            nexts = {
                tuple(s.split(" ")[: len(phrase) + 1]) for s in segs if s.split(" ")[: len(phrase)] == phrase
            }
            longer.update(n for n in nexts if len(n) > len(phrase))
        if not longer:
            break
        candidate, n = longer.most_common(1)[0]
        if n < 0.9 * count:
            break
        phrase = list(candidate)
    return " ".join(phrase)


def text_pattern(category_root: str | None) -> re.Pattern:
    categories = f"(?:{re.escape(category_root)}[^.]*)?" if category_root else "[^.]*"
    return re.compile(rf"^(?P<title>.*?)\. (?P<categories>{categories})\. (?P<brand>.*?)\.\s*$")


def parse_item_text(text: str, pattern: re.Pattern) -> dict[str, str] | None:
    """Split a 'title. category path. brand.' text into its fields; None when it does not split."""
    match = pattern.match(text.strip())
    if match is None:
        return None
    return {key: value.strip() for key, value in match.groupdict().items()}


def normalise_title(title: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", title.lower()).strip()


def descriptions_by_title(item_json: Path, items: dict[str, dict[str, str]]) -> dict[str, str]:
    """Join LC-Rec/CollisionGenRec descriptions by normalised title, using brand to break ties."""
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


def read_item_text(path: Path) -> dict[str, str]:
    texts = {}
    with open(path, encoding="utf-8") as handle:
        handle.readline()
        for line in handle:
            if line.strip():
                token, _, text = line.rstrip("\n").partition("\t")
                texts[token] = text
    return texts


# ----------------------------------------------------------------------------- conversion
def convert(
    src: Path,
    out: Path,
    name: str,
    prefix: str | None = None,
    features: dict[str, str] | None = None,
    descriptions: Path | None = None,
    category_root: str | None = None,
) -> dict:
    """Write ``<out>/<name>.{inter,item}`` and the feature files; returns counts."""
    start = time.perf_counter()
    prefix = prefix or find_prefix(src)
    item_path, user_path = src / f"{prefix}.item2index", src / f"{prefix}.user2index"
    sequences = read_sequences(src, prefix)
    indices = {i for seq in sequences.values() for i in seq}
    if item_path.is_file():
        item_index = read_index(item_path)
    else:
        item_index = {str(i): i for i in range(max(map(int, indices)) + 1)}
    user_index = read_index(user_path) if user_path.is_file() else {u: int(u) for u in sequences}
    index_to_item = {index: token for token, index in item_index.items()}
    index_to_user = {index: token for token, index in user_index.items()}
    unknown = sorted(i for i in indices if int(i) not in index_to_item)[:5]
    if unknown or any(int(u) not in index_to_user for u in sequences):
        raise BenchmarkFormatError(f"{prefix}: item or user indices without a token, e.g. items {unknown}")

    out.mkdir(parents=True, exist_ok=True)
    n_rows = write_inter(
        out / f"{name}.inter",
        (
            (index_to_user[int(user)], [(index_to_item[int(item)], p) for p, item in enumerate(sequences[user])])
            for user in sorted(sequences, key=int)
        ),
    )

    text_path = src / f"{prefix}.text"
    unsplit, n_descriptions, root = 0, 0, category_root
    if text_path.is_file():
        texts = read_item_text(text_path)
        root = category_root if category_root is not None else detect_category_root(list(texts.values()))
        pattern = text_pattern(root)
        items = {}
        for asin, text in texts.items():
            fields = parse_item_text(text, pattern)
            if fields is None:
                unsplit += 1
                fields = {"title": text.strip().rstrip("."), "categories": "", "brand": ""}
            items[asin] = fields
        if descriptions is None:
            descriptions = src / "text_collisiongenrec" / f"{prefix}.item.json"
        joined = descriptions_by_title(descriptions, items) if descriptions.is_file() else {}
        n_descriptions = len(joined)
        order = sorted(items, key=lambda a: (item_index.get(a, len(item_index)), a))
        write_item_table(
            out / f"{name}.item",
            ([a, items[a]["title"], items[a]["categories"], items[a]["brand"], joined.get(a, "")] for a in order),
        )

    tokens = [index_to_item[i] for i in range(len(index_to_item))]
    mapping = dict(MISSREC_FEATURES if features is None else features)
    written = {}
    for path in sorted(src.glob(f"{prefix}.feat*")):
        suffix = path.name[len(prefix) + 1:]
        modality = mapping.get(suffix)
        if modality is None:
            print(f"skipped {path.name}: no modality given for '{suffix}' (use --feature {suffix}=MODALITY)")
            continue
        raw = np.fromfile(path, dtype=np.float32)
        if raw.size == 0 or raw.size % len(tokens):
            raise BenchmarkFormatError(f"{path.name}: {raw.size} floats is not a multiple of {len(tokens)} items")
        write_item_features(out, name, modality, tokens, raw.reshape(len(tokens), -1))
        written[modality] = raw.size // len(tokens)
    missing = sorted(set(mapping) - {p.name[len(prefix) + 1:] for p in src.glob(f"{prefix}.feat*")})
    if features is not None and missing:
        raise BenchmarkFormatError(f"{src}: no {prefix}.{missing[0]} file")

    result = {
        "users": len(sequences),
        "items": len(indices),
        "interactions": n_rows,
        "features": written,
        "category_root": root,
        "unsplit_texts": unsplit,
        "descriptions": n_descriptions,
        "seconds": time.perf_counter() - start,
    }
    feature_text = ", ".join(f"{m} {d}-d" for m, d in written.items()) or "none"
    print(summary(
        out, name, len(sequences), len(indices), n_rows,
        f"features: {feature_text}; category root {root!r}, {unsplit} texts not split; "
        f"descriptions for {n_descriptions} items; {result['seconds']:.1f} s",
    ))
    return result


def parse_features(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    mapping = {}
    for value in values:
        suffix, sep, modality = value.partition("=")
        if not sep or not suffix or not re.fullmatch(r"[A-Za-z0-9_-]+", modality):
            raise argparse.ArgumentTypeError(f"--feature expects SUFFIX=MODALITY (e.g. feat3CLS=image), got {value!r}")
        mapping[suffix] = modality
    return mapping


def build_parser(description: str = __doc__, **defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required="src" not in defaults, default=defaults.get("src"),
                        help="folder holding <prefix>.train.inter etc.")
    parser.add_argument("--out", type=Path, default=defaults.get("out"), help="output folder (default: dataset/<name>)")
    parser.add_argument("--name", required="name" not in defaults, default=defaults.get("name"),
                        help="dataset name: the output files are <name>.inter etc.")
    parser.add_argument("--prefix", default=defaults.get("prefix"),
                        help="input file prefix (default: from *.test.inter)")
    parser.add_argument("--feature", action="append", metavar="SUFFIX=MODALITY",
                        help="feature file suffix and its modality, repeatable (default: feat1CLS=text feat3CLS=image)")
    parser.add_argument("--descriptions", type=Path, default=None,
                        help="LC-Rec style <prefix>.item.json "
                        "(default: text_collisiongenrec/<prefix>.item.json if present)")
    parser.add_argument("--category-root", default=None,
                        help="root category that starts every category path (default: detected)")
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> dict:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        features = parse_features(args.feature)
        return convert(
            args.src, args.out or Path("dataset") / args.name, args.name, args.prefix, features,
            args.descriptions, args.category_root,
        )
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    except (BenchmarkFormatError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
