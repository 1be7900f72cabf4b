"""Helpers shared by the dataset_prep converters: atomic RecBole atomic files, progress, small parsers.

Every converter writes a RecBole dataset folder ``<out>/`` holding

* ``<name>.inter``: ``user_id:token  item_id:token  timestamp:float`` (TSV), one row per
  interaction, grouped by user, in each user's chronological order;
* optionally ``<name>.item``: ``item_id:token  title:token_seq  categories:token_seq
  brand:token  description:token_seq`` (TSV, tabs and newlines inside a field become spaces),
  plus extra columns where a converter documents them (e.g. ``keywords:token_seq``);
* optionally feature files ``<name>.<modality>.npy`` / ``.items`` (see
  ``reveal_recbole.data.features``).

All files are written atomically (temporary file in the same folder, then rename), so an
interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm import tqdm

from reveal_recbole.atomic import atomic_target

INTER_HEADER = ("user_id:token", "item_id:token", "timestamp:float")
ITEM_COLUMNS = ("title", "categories", "brand", "description")
ITEM_HEADER = ("item_id:token", "title:token_seq", "categories:token_seq", "brand:token", "description:token_seq")


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "it") -> Iterator:
    """A tqdm progress bar on stderr (shown for long loops; cheap when short)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=1.0, dynamic_ncols=True, leave=False)


def clean_field(value) -> str:
    """One line of text: tabs, newlines and runs of spaces become single spaces."""
    if value is None:
        return ""
    return " ".join(str(value).replace("\t", " ").split())


def format_timestamp(value: float) -> str:
    """Integers without a decimal point (``3``), other floats in shortest round-trip form."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def write_inter(path: str | Path, sequences: Iterable[tuple[str, Sequence[tuple[str, float]]]]) -> int:
    """Write ``<name>.inter`` atomically, row by row (no copy of the whole text in memory); returns the row count."""
    rows = 0
    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(INTER_HEADER) + "\n")
        for user, events in sequences:
            for item, timestamp in events:
                handle.write(f"{user}\t{item}\t{format_timestamp(timestamp)}\n")
                rows += 1
    return rows


def write_item_table(
    path: str | Path, rows: Iterable[Sequence], extra_header: Sequence[str] = ()
) -> int:
    """Write ``<name>.item`` atomically, row by row: ``(item, title, categories, brand, description, *extra)`` rows."""
    header = list(ITEM_HEADER) + list(extra_header)
    count = 0
    with atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            if len(row) != len(header):
                raise ValueError(f"item row {row[:1]} has {len(row)} fields, header has {len(header)}")
            handle.write("\t".join(clean_field(value) for value in row) + "\n")
            count += 1
    return count


def read_inter(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """Read a ``.inter`` written by these converters: user -> [(item, timestamp)] in file order."""
    sequences: dict[str, list[tuple[str, float]]] = {}
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        columns = [field.split(":")[0] for field in header]
        u, i, t = columns.index("user_id"), columns.index("item_id"), columns.index("timestamp")
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            sequences.setdefault(parts[u], []).append((parts[i], float(parts[t])))
    return sequences


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def count_lines(path: str | Path) -> int | None:
    """Line count of a plain file (for progress totals); None for compressed files (unknown cheaply)."""
    path = Path(path)
    if path.suffix == ".gz":
        return None
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def summary(out: Path, name: str, users: int, items: int, interactions: int, extra: str = "") -> str:
    density = interactions / (users * items) if users and items else 0.0
    text = (
        f"wrote {out}/{name}.inter: {users:,} users, {items:,} items, {interactions:,} interactions "
        f"(sparsity {100 * (1 - density):.4f}%)"
    )
    return text + (f"; {extra}" if extra else "")
