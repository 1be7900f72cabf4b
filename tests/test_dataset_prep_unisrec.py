"""dataset_prep/convert_unisrec.py (and its convert_decorec.py entry point) on real extracts."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dataset_prep import convert_decorec, convert_unisrec
from dataset_prep.common import read_inter
from reveal_recbole.data.features import feature_paths, read_feature_file

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "tests" / "data" / "unisrec"
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
BUNDLED = ROOT / "reveal_recbole" / "dataset_example" / "scientific"


def index(path: Path) -> dict[str, str]:
    return dict(line.split("\t") for line in path.read_text().splitlines())


def test_extract_converts_sequences_text_and_features(tmp_path):
    result = convert_unisrec.convert(DATA, tmp_path, "sci")
    assert (result["users"], result["items"], result["interactions"]) == (20, 145, 156)
    assert result["category_root"] == "Industrial & Scientific" and result["unsplit_texts"] == 0
    assert result["features"] == {"text": 8, "image": 8} and result["descriptions"] == 8

    items = {v: k for k, v in index(DATA / "Scientific.item2index").items()}
    users = {v: k for k, v in index(DATA / "Scientific.user2index").items()}
    expected = {}
    for line in (DATA / "Scientific.test.inter").read_text().splitlines()[1:]:
        user, history, target = line.split("\t")
        expected[users[user]] = [items[i] for i in history.split()] + [items[target]]
    inter = read_inter(tmp_path / "sci.inter")
    assert {u: [i for i, _ in events] for u, events in inter.items()} == expected
    assert all([t for _, t in events] == list(range(len(events))) for events in inter.values())

    rows = {r.split("\t")[0]: r.split("\t") for r in (tmp_path / "sci.item").read_text().splitlines()[1:]}
    assert len(rows) == 145
    assert rows["B000052030"][1:4] == [
        "M-D Building Products 2311 High Density Foam Tape, 1/2-by-3/4-Inch by 10 feet, Gray",
        "Industrial & Scientific Tapes, Adhesives & Sealants Adhesive Tapes Foam Tape",
        "M-D Building Products",
    ]
    assert sum(bool(row[4]) for row in rows.values()) == 8  # descriptions joined from the item.json extract

    raw = np.fromfile(DATA / "Scientific.feat3CLS", dtype=np.float32).reshape(145, 8)
    tokens, array = read_feature_file(*feature_paths(tmp_path, "sci", "image"))
    by_index = index(DATA / "Scientific.item2index")
    for token, row in zip(tokens, np.asarray(array)):
        assert np.array_equal(row, raw[int(by_index[token])])


def unisrec_files(folder: Path, prefix: str, sequences: dict[int, list[int]], cut: int = 50) -> None:
    """Benchmark files written the way UniSRec's process_amazon.py writes them (histories cut to 50)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    train, valid, test = [header], [header], [header]
    for user, seq in sequences.items():
        train_seq = [str(i) for i in seq[:-2]]
        for target_idx in range(1, len(train_seq)):
            history = train_seq[:-target_idx][-cut:]
            train.append(f"{user}\t{' '.join(history)}\t{train_seq[-target_idx]}\n")
        valid.append(f"{user}\t{' '.join(train_seq[-cut:])}\t{seq[-2]}\n")
        test.append(f"{user}\t{' '.join((train_seq + [str(seq[-2])])[-cut:])}\t{seq[-1]}\n")
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{prefix}.{split}.inter").write_text("".join(lines))


def test_long_sequences_are_rebuilt_from_the_train_rows(tmp_path):
    rng = np.random.default_rng(0)
    sequences = {0: list(rng.permutation(200)[:73]), 1: [5, 6, 7], 2: list(range(10, 62))}
    unisrec_files(tmp_path / "src", "Office", sequences)
    result = convert_unisrec.convert(tmp_path / "src", tmp_path / "out", "office")
    assert result["features"] == {} and result["interactions"] == 73 + 3 + 52
    inter = read_inter(tmp_path / "out" / "office.inter")
    assert {u: [int(i) for i, _ in ev] for u, ev in inter.items()} == {str(u): s for u, s in sequences.items()}
    assert not (tmp_path / "out" / "office.item").exists()  # no .text file


def test_inconsistent_splits_are_errors(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DATA, src)
    lines = (src / "Scientific.valid.inter").read_text().splitlines()
    user, history, target = lines[1].split("\t")
    lines[1] = "\t".join([user, history + " 3", target])
    (src / "Scientific.valid.inter").write_text("\n".join(lines) + "\n")
    with pytest.raises(convert_unisrec.BenchmarkFormatError, match="valid"):
        convert_unisrec.convert(src, tmp_path / "out", "sci")


def test_feature_names_and_sizes(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(DATA, src)
    shutil.copy(src / "Scientific.feat1CLS", src / "Scientific.feat2CLS")
    result = convert_unisrec.convert(src, tmp_path / "a", "sci")
    assert set(result["features"]) == {"text", "image"}
    assert "skipped Scientific.feat2CLS" in capsys.readouterr().out
    result = convert_unisrec.convert(src, tmp_path / "b", "sci", features={"feat2CLS": "text_dropped"})
    assert result["features"] == {"text_dropped": 8}
    with pytest.raises(convert_unisrec.BenchmarkFormatError, match="no Scientific.feat9CLS"):
        convert_unisrec.convert(src, tmp_path / "c", "sci", features={"feat9CLS": "x"})
    (src / "Scientific.feat3CLS").write_bytes(b"\0" * 12)
    with pytest.raises(convert_unisrec.BenchmarkFormatError, match="not a multiple"):
        convert_unisrec.convert(src, tmp_path / "d", "sci")
    with pytest.raises(SystemExit):
        convert_unisrec.main(["--src", str(src), "--name", "x", "--feature", "nonsense"])


def test_category_root_detection_and_unsplit_texts():
    texts = [
        "Pen. Office Products Office & School Supplies Pens. Bic.",
        "Desk. Lamp. Office Products Furniture. Ikea.",
        "Stapler. Office Products Staplers. Swingline.",
        "Just a title without parts",
    ]
    root = convert_unisrec.detect_category_root(texts)
    assert root == "Office Products"
    pattern = convert_unisrec.text_pattern(root)
    assert convert_unisrec.parse_item_text(texts[1], pattern) == {
        "title": "Desk. Lamp", "categories": "Office Products Furniture", "brand": "Ikea",
    }
    assert convert_unisrec.parse_item_text(texts[3], pattern) is None
    assert convert_unisrec.detect_category_root(["a", "b"]) is None


@pytest.mark.skipif(not (SHARED / "amazon_scientific_mm_decorec").is_dir(), reason="shared real data absent")
def test_decorec_entry_point_rebuilds_the_bundled_set_byte_for_byte(tmp_path):
    result = convert_decorec.main(["--out", str(tmp_path), "--src", str(SHARED / "amazon_scientific_mm_decorec")])
    assert (result["users"], result["items"], result["interactions"]) == (2928, 1585, 19712)
    for path in sorted(BUNDLED.glob("scientific.*")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
