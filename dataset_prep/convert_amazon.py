"""Convert raw Amazon Reviews (McAuley 2014 or 2018) into a k-core RecBole dataset with item text and image URLs.

Input:

* ``--reviews``: ``reviews_<Category>_5.json.gz`` (2014) or ``<Category>.json.gz`` /
  ``<Category>_5.json.gz`` (2018): one JSON object per line with ``reviewerID``, ``asin``,
  ``unixReviewTime`` (and ``reviewText``/``summary``, used for keywords). Plain or gzip.
* ``--meta`` (optional): ``meta_<Category>.json.gz``. 2014 lines are Python literals
  (``{'asin': ..., 'imUrl': ...}``) and are parsed with ``ast.literal_eval`` (never ``eval``);
  2018 lines are JSON. Lines that neither parser accepts are skipped and counted (those of the
  kept items; of every reviewed item under ``--require-meta``/``--require-image``).

Processing:

1. Rows lacking a reviewer, an ASIN or a time are skipped (counted). Repeated (user, item)
   pairs keep their earliest review (by time, then file order) unless ``--keep-duplicates``.
2. Optionally (``--require-meta``, ``--require-image``) items without a metadata record / an
   image URL are dropped first, as UniSRec and MISSRec do.
3. k-core filtering (``--k``, default 5; ``--user-k``/``--item-k`` to differ): users and items
   with fewer than k interactions are removed, and the count-and-remove step repeats until
   nothing changes, so every remaining user and item has at least k interactions.
4. Chronological order per user by ``unixReviewTime``; ties (the 2014 and 2018 times have day
   resolution) keep the order of the input file. So that RecBole's own sort by timestamp keeps
   that order, the n interactions of a user sharing one time t get timestamps t, t + 1/n,
   t + 2/n, ... (less than one second apart, so the day is unchanged).

Output (``--out``, default ``dataset/<name>``):

* ``<name>.inter``: ``user_id:token item_id:token timestamp:float``, users in order of first
  appearance in the reviews file.
* ``<name>.item``: ``item_id title categories brand description keywords`` (the last column is
  ``keywords:token_seq``). ``categories`` is one category path joined by `` > ``: the 2018
  ``category`` list, or, of the 2014 ``categories`` paths, the longest path whose root is the
  most common root among the kept items (the dataset's own category), else the first path.
  HTML entities are decoded and tags removed; descriptions are cut to
  ``--max-description-chars``.
* ``<name>.reviews``: ``item_id<TAB>review`` (header ``item_id review``), the first
  ``--reviews-per-item`` training reviews of each item in file order (``summary. reviewText``,
  one line, cut to ``--max-review-chars``), read by FVE's critic as untrusted text.
* ``<name>.images.tsv``: ``item_id<TAB>image_urls`` (URLs separated by spaces, the first one
  the main image) for items that have any: ``imUrl`` (2014); ``imageURLHighRes``, else
  ``imageURL``, else ``image`` (2018). For a later image downloader.

Training reviews only (``--reviews-from train``, the default): the keywords and the
``.reviews`` file use the reviews of training interactions only. RecBole's leave-one-out split
(``LS: valid_and_test``) holds out each user's last two interactions (``min(2, n - 1)`` of n),
the validation and the test target; a review written with a held-out interaction describes
the very item the model must predict for that user, so it must not reach the item's prompt,
its features or FVE's critic. ``--reviews-from all`` uses every kept review (the authors'
choice, which leaks the held-out targets' reviews).

Review keywords (the ``keywords`` column, ``--keywords`` per item, 0 to skip): for each kept
item, the words of its training reviews (``summary`` + ``reviewText``, lower-cased, letters only,
3+ letters, a built-in English stop-word list removed) are counted once per review, giving the
review frequency rf(w, i). Words found in fewer than ``--min-df`` items or in more than
``--max-df`` of the items are dropped (too rare to trust / too generic, e.g. "great"); a word
must also occur in at least min(2, number of the item's reviews) of its reviews. The score is
TF-IDF with sublinear tf and smoothed idf,

    score(w, i) = (1 + ln rf(w, i)) * (ln((1 + N) / (1 + df(w))) + 1),

N the number of items and df(w) the number of items whose reviews contain w; the top words
by score (ties: alphabetical) are kept.

Memory stays bounded on the full 2018/2023 category files (tens of millions of reviews,
millions of metadata records): the reviews are read twice, their ids and times first (24 bytes
a review for the k-core and the order), then the kept reviews' texts; keyword counts are kept
once per distinct (item, word) pair; the ``.reviews`` lines wait in an unnamed temporary file
in ``--out``; the metadata is read once the kept items are known (plus a flags-only pass under
``--require-meta``/``--require-image``), keeping only the fields written, of the kept items
only. The outputs are written as they are produced into hidden temporary files in ``--out``,
renamed together once all are complete: a failed or killed run leaves no output file.

Usage::

    python dataset_prep/convert_amazon.py --reviews raw/reviews_Sports_and_Outdoors_5.json.gz \
        --meta raw/meta_Sports_and_Outdoors.json.gz --out dataset/sports_raw --name sports_raw
    python dataset_prep/convert_amazon.py --reviews raw/Industrial_and_Scientific_5.json.gz \
        --meta raw/meta_Industrial_and_Scientific.json.gz --name scientific2018 --require-image
"""
from __future__ import annotations

import argparse
import ast
import calendar
import contextlib
import html
import json
import re
import sys
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np

from dataset_prep.common import clean_field, open_text, progress, summary, write_inter, write_item_table
from reveal_recbole.atomic import atomic_target

ASIN_PATTERN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
TAG_PATTERN = re.compile(r"<[^>]*>")
WORD_PATTERN = re.compile(r"[a-z]{3,}")
STOP_WORDS = frozenset(
    """
    about above after again against all also although always among and another any anyone anything are
    aren around because been before being below between both but can cannot could couldn did didn does
    doesn doing done don down during each either else enough even ever every few for from further get gets
    getting got had hadn has hasn have haven having her here hers herself him himself his how however into
    isn its itself just let like made make makes many may might mine more most much must myself need needs
    neither never nor not now off once one ones only onto other others our ours ourselves out over own per
    put quite rather really said same see seem seems several shall she should shouldn since some something
    still such than that the their theirs them themselves then there these they thing things this those
    though through thus too under until upon use used using very via was wasn way well went were weren
    what when where whether which while who whom whose why will with within without won would wouldn yet
    you your yours yourself yourselves one two three four five item items product products bought buy
    amazon review star stars
    """.split()
)
T = TypeVar("T")


class AmazonFormatError(ValueError):
    """Input that cannot be converted; the message names the file and the cause."""


# ----------------------------------------------------------------------------- parsing
def parse_record(line: str) -> dict | None:
    """One metadata or review line: JSON (2018, reviews) or a Python literal (2014 metadata).

    ``ast.literal_eval`` only builds literals (strings, numbers, lists, dicts, ...): a line
    holding any other expression is rejected, never executed. Returns None when unparseable.
    """
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None
    return record if isinstance(record, dict) else None


def strip_markup(value) -> str:
    """Text of a metadata field: lists joined, HTML entities decoded, tags removed, one line."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(strip_markup(v) for v in value)
    return clean_field(TAG_PATTERN.sub(" ", html.unescape(str(value))))


def cut_words(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " ..."


def category_paths(record: dict) -> list[list[str]]:
    """Candidate category paths: 2014 ``categories`` (list of paths) or 2018 ``category`` (one path)."""
    raw = record.get("categories")
    paths = []
    if isinstance(raw, list):
        for path in raw:
            if isinstance(path, (list, tuple)):
                nodes = [strip_markup(node) for node in path]
                paths.append([n for n in nodes if n])
            elif isinstance(path, str) and strip_markup(path):
                paths.append([strip_markup(path)])
    flat = record.get("category")
    if isinstance(flat, list):
        nodes = [strip_markup(node) for node in flat]
        paths.append([n for n in nodes if n])
    return [p for p in paths if p]


def choose_path(paths: Sequence[Sequence[str]], root: str | None) -> Sequence[str]:
    rooted = [p for p in paths if root is not None and p[0] == root]
    if rooted:
        return max(rooted, key=len)  # max keeps the first of equally long paths
    return paths[0] if paths else []


def image_urls(record: dict) -> list[str]:
    """Image URLs of a metadata record, main image first (see the module docstring)."""
    for key in ("imageURLHighRes", "imageURL", "image", "imUrl"):
        value = record.get(key)
        urls = [value] if isinstance(value, str) else list(value or []) if isinstance(value, list) else []
        urls = [u.strip() for u in urls if isinstance(u, str) and u.strip().startswith(("http://", "https://"))]
        if urls:
            return list(dict.fromkeys(urls))
    return []


# ----------------------------------------------------------------------------- interactions
class Interactions:
    """The review rows as integer arrays (user, item, time, line number) plus the token tables."""

    def __init__(self):
        self.user_tokens: list[str] = []
        self.item_tokens: list[str] = []
        self.skipped = 0
        self.lines = 0

    @classmethod
    def read(cls, path: Path) -> "Interactions":
        """One pass over the reviews keeping 24 bytes per review (int32 user and item, int64 line, float64 time)."""
        self = cls()
        user_ids: dict[str, int] = {}
        item_ids: dict[str, int] = {}
        users, items, line_numbers = array("i"), array("i"), array("q")
        times = array("d")
        with open_text(path) as handle:
            for number, line in enumerate(progress(handle, f"read {path.name}", unit="reviews")):
                self.lines += 1
                record = parse_record(line)
                timestamp = review_time(record) if record else None
                user = record.get("reviewerID") if record else None
                item = record.get("asin") if record else None
                if not (isinstance(user, str) and user and isinstance(item, str) and item and timestamp is not None):
                    self.skipped += 1
                    continue
                users.append(user_ids.setdefault(user, len(user_ids)))
                items.append(item_ids.setdefault(item, len(item_ids)))
                times.append(timestamp)
                line_numbers.append(number)
        if not users:
            raise AmazonFormatError(f"{path}: no review line with reviewerID, asin and unixReviewTime")
        self.user_tokens = list(user_ids)
        self.item_tokens = list(item_ids)
        self.user = np.frombuffer(users, dtype=np.int32)
        self.item = np.frombuffer(items, dtype=np.int32)
        self.time = np.frombuffer(times, dtype=np.float64)
        self.line = np.frombuffer(line_numbers, dtype=np.int64)
        return self


def review_time(record: dict) -> float | None:
    value = record.get("unixReviewTime")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().isdigit():
        return float(value)
    text = record.get("reviewTime")  # "MM DD, YYYY"
    if isinstance(text, str):
        try:
            return float(calendar.timegm(time.strptime(text.strip(), "%m %d, %Y")))
        except ValueError:
            return None
    return None


def first_of_duplicates(
    user: np.ndarray, item: np.ndarray, times: np.ndarray, line: np.ndarray, n_items: int
) -> np.ndarray:
    """Mask keeping, of each repeated (user, item) pair, the earliest row (time, then file order)."""
    key = user.astype(np.int64) * n_items + item
    order = np.lexsort((line, times, key))
    keep_sorted = np.ones(len(order), dtype=bool)
    keep_sorted[1:] = key[order][1:] != key[order][:-1]
    keep = np.zeros(len(order), dtype=bool)
    keep[order[keep_sorted]] = True
    return keep


def k_core(user: np.ndarray, item: np.ndarray, mask: np.ndarray, user_k: int, item_k: int) -> tuple[np.ndarray, int]:
    """Iterate 'drop users with < user_k and items with < item_k interactions' until stable."""
    mask = mask.copy()
    rounds = 0
    n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
    while True:
        rounds += 1
        user_count = np.bincount(user[mask], minlength=n_users)
        item_count = np.bincount(item[mask], minlength=n_items)
        new_mask = mask & (user_count[user] >= user_k) & (item_count[item] >= item_k)
        if np.array_equal(new_mask, mask):
            return mask, rounds
        mask = new_mask


def chronological(user: np.ndarray, times: np.ndarray, line: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Indices of the kept rows grouped by user (first appearance order), by time, ties by file order."""
    kept = np.flatnonzero(mask)
    first_line = np.full(int(user.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_line, user[kept], line[kept])
    order = np.lexsort((line[kept], times[kept], first_line[user[kept]]))
    return kept[order]


def tie_broken_times(user: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Within each (user, time) run of n rows (already ordered), add 0, 1/n, 2/n, ..."""
    out = times.astype(np.float64).copy()
    n = len(out)
    start = 0
    while start < n:
        end = start + 1
        while end < n and user[end] == user[start] and times[end] == times[start]:
            end += 1
        if end - start > 1:
            out[start:end] += np.arange(end - start) / (end - start)
        start = end
    return out


# ----------------------------------------------------------------------------- metadata
class ItemMeta(NamedTuple):
    """What the outputs use of a metadata record, already cleaned: a full record (related items,
    ranks, features, ...) is many times larger, and millions of them do not fit in memory."""

    title: str
    category_paths: tuple[tuple[str, ...], ...]
    brand: str
    description: str
    image_urls: tuple[str, ...]

    @classmethod
    def from_record(cls, record: dict, max_description_chars: int) -> "ItemMeta":
        return cls(
            strip_markup(record.get("title")),
            tuple(tuple(path) for path in category_paths(record)),
            strip_markup(record.get("brand")),
            cut_words(strip_markup(record.get("description")), max_description_chars),
            tuple(image_urls(record)),
        )


def read_meta(path: Path, wanted: set[str], keep: Callable[[dict], T]) -> tuple[dict[str, T], int]:
    """``keep(record)`` of the first record of each wanted ASIN, and the count of unparseable wanted lines.

    Lines of other ASINs are never parsed (the ASIN is found by a regular expression) and no
    whole record outlives its line.
    """
    kept: dict[str, T] = {}
    bad = 0
    with open_text(path) as handle:
        for line in progress(handle, f"read {path.name}", unit="items"):
            match = ASIN_PATTERN.search(line)
            if match is None or match.group(1) not in wanted or match.group(1) in kept:
                continue
            record = parse_record(line)
            if record is None or record.get("asin") != match.group(1):
                bad += 1
                continue
            kept[match.group(1)] = keep(record)
    return kept, bad


# ----------------------------------------------------------------------------- keywords
REVIEWS_FROM = ("train", "all")
HELD_OUT = 2  # leave-one-out (LS: valid_and_test) holds out each user's last two interactions


def training_rows(users: np.ndarray, held_out: int = HELD_OUT) -> np.ndarray:
    """Mask of the rows RecBole's leave-one-out split trains on, for rows grouped by user in time order.

    Each user's last ``min(held_out, n - 1)`` of n rows are held out (validation, then test), as
    RecBole's ``_split_index_by_leave_one_out`` does; the rest are training rows.
    """
    n = len(users)
    if not n:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), lengths)
    from_end = (starts + lengths)[group] - 1 - np.arange(n)
    return from_end >= np.minimum(held_out, lengths - 1)[group]


def kept_review_texts(path: Path, kept_lines: np.ndarray, line_items: np.ndarray) -> Iterator[tuple[int, str]]:
    """(item index, ``summary`` + ``reviewText``) of every kept review, in file order."""
    order = np.argsort(kept_lines)
    lines, items = kept_lines[order], line_items[order]
    position = 0
    with open_text(path) as handle:
        for number, line in enumerate(progress(handle, f"review texts {path.name}", unit="reviews")):
            if position == len(lines):
                break
            if number == lines[position]:
                record = parse_record(line) or {}
                summary_text = str(record.get("summary") or "").strip()
                body = str(record.get("reviewText") or "").strip()
                text = f"{summary_text}. {body}" if summary_text and body else summary_text or body
                yield int(items[position]), text
                position += 1


WORD_BITS = 32  # a pair's key: item << WORD_BITS | word


class ReviewWordCounts:
    """The review frequency rf(w, i) of every (item, word) pair, stored once per distinct pair.

    Each review's distinct words go into a bounded buffer of pair keys that is merged, when
    full, into sorted distinct keys and their counts: memory grows with the distinct pairs
    (12 bytes each), not with the (review, word) pairs, which repeat an item's common words in
    every one of its reviews. The pairs are split into ``parts`` blocks of items, so that a merge
    or the scoring copies one block at a time, never all the pairs.
    """

    def __init__(self, n_items: int, buffer_size: int = 1 << 20, parts: int = 64):
        self.vocabulary: dict[str, int] = {}
        self.reviews = np.zeros(n_items, dtype=np.int64)
        self.items_per_part = max(1, -(-n_items // parts))
        self.keys = [np.zeros(0, dtype=np.int64) for _ in range(parts)]
        self.counts = [np.zeros(0, dtype=np.int32) for _ in range(parts)]
        self.buffer = array("q")
        self.buffer_size = buffer_size

    def add(self, item: int, text: str) -> None:
        words = {w for w in WORD_PATTERN.findall(text.lower()) if w not in STOP_WORDS}
        self.reviews[item] += 1
        high = item << WORD_BITS
        self.buffer.extend(high | self.vocabulary.setdefault(word, len(self.vocabulary)) for word in words)
        if len(self.buffer) >= self.buffer_size:
            self.merge()

    def merge(self) -> None:
        """Fold the buffer into each block's distinct keys (a linear insert, no re-sort of what is stored)."""
        new, new_counts = np.unique(np.frombuffer(self.buffer, dtype=np.int64), return_counts=True)
        self.buffer = array("q")
        block_starts = (np.arange(1, len(self.keys)) * self.items_per_part) << WORD_BITS
        splits = np.searchsorted(new, block_starts)
        for part, (added, added_counts) in enumerate(zip(np.split(new, splits), np.split(new_counts, splits))):
            keys, counts = self.keys[part], self.counts[part]
            at = np.searchsorted(keys, added)
            found = at < len(keys)
            found[found] = keys[at[found]] == added[found]
            counts[at[found]] += added_counts[found].astype(np.int32)
            self.keys[part] = np.insert(keys, at[~found], added[~found])
            self.counts[part] = np.insert(counts, at[~found], added_counts[~found].astype(np.int32))

    def keywords(
        self, item_tokens: list[str], top_k: int, min_df: int = 2, max_df: float = 0.5
    ) -> dict[str, list[str]]:
        """Top TF-IDF words of each item's reviews (the method is in the module docstring)."""
        self.merge()
        words_by_id = list(self.vocabulary)
        word_mask = (1 << WORD_BITS) - 1
        df = np.zeros(len(words_by_id), dtype=np.int64)
        for keys in self.keys:
            df += np.bincount(keys & word_mask, minlength=len(words_by_id))
        n_docs = int(np.count_nonzero(self.reviews))
        idf = np.log((1 + n_docs) / (1 + df)) + 1.0
        alphabetical = np.empty(len(words_by_id), dtype=np.int64)
        alphabetical[sorted(range(len(words_by_id)), key=words_by_id.__getitem__)] = np.arange(len(words_by_id))
        keywords: dict[str, list[str]] = {}
        for keys, rf in zip(self.keys, self.counts):  # a block holds all pairs of its items
            pair_item, pair_word = keys >> WORD_BITS, keys & word_mask
            ok = (df[pair_word] >= min_df) & (df[pair_word] <= max_df * n_docs) & (
                rf >= np.minimum(2, self.reviews[pair_item])
            )
            pair_item, pair_word, score = pair_item[ok], pair_word[ok], (1.0 + np.log(rf[ok])) * idf[pair_word[ok]]
            # by item, then score descending, then word ascending; the first top_k of each item
            order = np.lexsort((alphabetical[pair_word], -score, pair_item))
            sorted_items = pair_item[order]
            starts = np.flatnonzero(np.r_[True, sorted_items[1:] != sorted_items[:-1]])
            rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
            for item, word in zip(sorted_items[rank < top_k].tolist(), pair_word[order[rank < top_k]].tolist()):
                keywords.setdefault(item_tokens[item], []).append(words_by_id[word])
        return keywords


class ReviewSnippets:
    """The first ``per_item`` training reviews of each item, spooled to an unnamed temporary file as
    they are read (only their item and offset stay in memory) and written grouped by item at the end."""

    def __init__(self, folder: Path, n_items: int, per_item: int, max_chars: int):
        self.spool = tempfile.TemporaryFile(dir=folder)
        self.per_item, self.max_chars = per_item, max_chars
        self.written = np.zeros(n_items, dtype=np.int32)
        self.items, self.offsets = array("i"), array("q", [0])

    def add(self, item: int, text: str) -> None:
        text = clean_field(text)
        if self.written[item] < self.per_item and text:
            self.written[item] += 1
            self.items.append(item)
            self.offsets.append(self.offsets[-1] + self.spool.write(cut_words(text, self.max_chars).encode("utf-8")))

    def write(self, path: Path, item_order: np.ndarray, item_tokens: list[str]) -> None:
        """``item_id<TAB>review`` lines, items in ``item_order``, each item's reviews in file order."""
        rank = np.zeros(len(self.written), dtype=np.int64)
        rank[item_order] = np.arange(len(item_order))
        items = np.frombuffer(self.items, dtype=np.int32)
        with atomic_target(path) as tmp, open(tmp, "wb") as handle:
            handle.write(b"item_id\treview\n")
            for index in np.argsort(rank[items], kind="stable").tolist():
                self.spool.seek(self.offsets[index])
                text = self.spool.read(self.offsets[index + 1] - self.offsets[index])
                handle.write(item_tokens[items[index]].encode("utf-8") + b"\t" + text + b"\n")

    def close(self) -> None:
        self.spool.close()


# ----------------------------------------------------------------------------- conversion
def convert(
    reviews: Path,
    out: Path,
    name: str,
    meta: Path | None = None,
    k: int = 5,
    user_k: int | None = None,
    item_k: int | None = None,
    keep_duplicates: bool = False,
    require_meta: bool = False,
    require_image: bool = False,
    keywords: int = 10,
    min_df: int = 2,
    max_df: float = 0.5,
    max_description_chars: int = 1000,
    reviews_per_item: int = 10,
    max_review_chars: int = 1000,
    reviews_from: str = "train",
) -> dict:
    """Convert; ``reviews_from="train"`` takes keywords and ``.reviews`` from training interactions only.

    Two passes over each input: the reviews' ids and times first (k-core, order), then the kept
    reviews' texts; metadata is read once the kept items are known (and once before, for flags
    only, under ``require_meta``/``require_image``). The outputs are staged as hidden temporary
    files in ``out`` and renamed together at the end: a failed or killed run leaves none of them.
    """
    start = time.perf_counter()
    if (require_meta or require_image) and meta is None:
        raise AmazonFormatError("--require-meta / --require-image need --meta")
    if reviews_from not in REVIEWS_FROM:
        raise AmazonFormatError(f"--reviews-from must be one of {', '.join(REVIEWS_FROM)}, got {reviews_from!r}")
    data = Interactions.read(reviews)
    mask = np.ones(len(data.user), dtype=bool)
    if not keep_duplicates:
        mask &= first_of_duplicates(data.user, data.item, data.time, data.line, len(data.item_tokens))
    duplicates = int((~mask).sum())

    bad_meta = 0  # unparseable metadata lines: of every reviewed item where the filters read them all
    if require_meta or require_image:
        has_image, bad_meta = read_meta(meta, set(data.item_tokens), lambda record: bool(image_urls(record)))
        allowed = np.array([has_image.get(t, False) if require_image else t in has_image for t in data.item_tokens])
        mask &= allowed[data.item]
        del has_image, allowed
    mask, rounds = k_core(data.user, data.item, mask, user_k or k, item_k or k)
    if not mask.any():
        raise AmazonFormatError(f"{reviews}: nothing is left after the {user_k or k}/{item_k or k}-core filter")
    rows = chronological(data.user, data.time, data.line, mask)
    users, items = data.user[rows], data.item[rows]
    timestamps = tie_broken_times(users, data.time[rows])
    first_rows = np.unique(items, return_index=True)[1]
    item_order = items[np.sort(first_rows)]  # items in order of first appearance
    tokens = [data.item_tokens[i] for i in item_order.tolist()]

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as staged:
        def stage(suffix: str) -> Path:
            return Path(staged.enter_context(atomic_target(out / f"{name}{suffix}")))

        n_rows = write_inter(stage(".inter"), user_sequences(users, items, timestamps, data))

        review_rows = training_rows(users) if reviews_from == "train" else np.ones(len(rows), dtype=bool)
        word_counts = ReviewWordCounts(len(data.item_tokens))
        snippets = ReviewSnippets(out, len(data.item_tokens), reviews_per_item, max_review_chars)
        staged.callback(snippets.close)
        if keywords > 0 or reviews_per_item > 0:
            for item, text in kept_review_texts(reviews, data.line[rows[review_rows]], items[review_rows]):
                snippets.add(item, text)
                if keywords > 0:
                    word_counts.add(item, text)
        words = word_counts.keywords(data.item_tokens, keywords, min_df, max_df) if keywords > 0 else {}
        del word_counts
        if reviews_per_item > 0:
            snippets.write(stage(".reviews"), item_order, data.item_tokens)

        records: dict[str, ItemMeta] = {}
        if meta is not None:
            records, bad_kept = read_meta(
                meta, set(tokens), lambda record: ItemMeta.from_record(record, max_description_chars)
            )
            bad_meta = bad_meta or bad_kept
        roots = Counter(p[0] for t in tokens if t in records for p in records[t].category_paths)
        root = roots.most_common(1)[0][0] if roots else None
        def item_rows() -> Iterator[list[str]]:
            for token in tokens:
                record = records.get(token, ItemMeta("", (), "", "", ()))
                category = " > ".join(choose_path(record.category_paths, root))
                yield [token, record.title, category, record.brand, record.description, " ".join(words.get(token, []))]

        write_item_table(stage(".item"), item_rows(), extra_header=["keywords:token_seq"])
        items_with_image = 0
        if meta is not None:
            with open(stage(".images.tsv"), "w", encoding="utf-8", newline="\n") as handle:
                handle.write("item_id\timage_urls\n")
                for token in tokens:
                    if token in records and records[token].image_urls:
                        handle.write(f"{token}\t{' '.join(records[token].image_urls)}\n")
                        items_with_image += 1

    result = {
        "users": len(np.unique(users)),
        "items": len(tokens),
        "interactions": n_rows,
        "review_lines": data.lines,
        "skipped_lines": data.skipped,
        "duplicates_dropped": duplicates,
        "kcore_rounds": rounds,
        "items_with_meta": sum(t in records for t in tokens),
        "items_with_image": items_with_image,
        "reviews_from": reviews_from,
        "held_out_reviews_unused": int((~review_rows).sum()),
        "reviews_written": len(snippets.items),
        "unparseable_meta_lines": bad_meta,
        "seconds": time.perf_counter() - start,
    }
    print(summary(out, name, result["users"], result["items"], n_rows, ", ".join(
        f"{key.replace('_', ' ')} {value if key != 'seconds' else f'{value:.1f}'}"
        for key, value in result.items() if key not in ("users", "items", "interactions")
    )))
    return result


def user_sequences(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, data: Interactions
) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """(user token, [(item token, timestamp), ...]) of rows grouped by user, one user at a time."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for start, end in zip(starts.tolist(), np.r_[starts[1:], len(users)].tolist()):
        events = zip(items[start:end].tolist(), timestamps[start:end].tolist())
        yield data.user_tokens[users[start]], [(data.item_tokens[i], t) for i, t in events]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=Path, required=True, help="reviews JSON lines (.json or .json.gz)")
    parser.add_argument("--meta", type=Path, default=None, help="metadata lines (2014 Python literals or 2018 JSON)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: dataset/<name>)")
    parser.add_argument("--name", required=True, help="dataset name: the output files are <name>.inter etc.")
    parser.add_argument("--k", type=int, default=5, help="k-core threshold for users and items (default 5)")
    parser.add_argument("--user-k", type=int, default=None, help="k for users (default: --k)")
    parser.add_argument("--item-k", type=int, default=None, help="k for items (default: --k)")
    parser.add_argument("--keep-duplicates", action="store_true", help="keep repeated (user, item) reviews")
    parser.add_argument("--require-meta", action="store_true", help="drop items without a metadata record first")
    parser.add_argument("--require-image", action="store_true", help="drop items without an image URL first")
    parser.add_argument("--keywords", type=int, default=10, help="review keywords per item (0: skip)")
    parser.add_argument("--min-df", type=int, default=2, help="a keyword must occur in at least this many items")
    parser.add_argument("--max-df", type=float, default=0.5, help="...and in at most this fraction of the items")
    parser.add_argument("--max-description-chars", type=int, default=1000, help="cut descriptions (0: keep all)")
    parser.add_argument("--reviews-per-item", type=int, default=10,
                        help="reviews per item written to <name>.reviews for FVE's critic (0: no file)")
    parser.add_argument("--max-review-chars", type=int, default=1000, help="cut each written review (0: keep all)")
    parser.add_argument("--reviews-from", choices=REVIEWS_FROM, default="train",
                        help="reviews behind the keywords and <name>.reviews: train (default: not each user's last "
                             "two, the leave-one-out validation and test targets) or all (leaks them)")
    args = parser.parse_args(argv)
    try:
        return convert(
            args.reviews, args.out or Path("dataset") / args.name, args.name, args.meta, args.k, args.user_k,
            args.item_k, args.keep_duplicates, args.require_meta, args.require_image, args.keywords, args.min_df,
            args.max_df, args.max_description_chars, args.reviews_per_item, args.max_review_chars, args.reviews_from,
        )
    except (AmazonFormatError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
