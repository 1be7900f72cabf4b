"""dataset_prep/convert_s3rec.py on small real extracts (tests/data/s3rec) and, when present, the full files."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dataset_prep import convert_s3rec
from dataset_prep.common import read_inter

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "tests" / "data" / "s3rec"
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))


def user_sequences(path: Path) -> dict[str, list[str]]:
    return {p[0]: p[1:] for p in (line.split() for line in path.read_text().splitlines()) if p}


def test_sports_extract_maps_ids_to_asins_with_positions_as_timestamps(tmp_path):
    result = convert_s3rec.convert(DATA / "sports", tmp_path, "sports")
    inter = read_inter(tmp_path / "sports.inter")
    s3rec = user_sequences(DATA / "sports" / "Sports_and_Outdoors.txt")
    maps = json.loads((DATA / "sports" / "datamaps.json").read_text())
    expected = {maps["id2user"][u]: [maps["id2item"][i] for i in seq] for u, seq in s3rec.items()}
    assert list(inter) == list(expected)  # users in the S3-Rec file's order
    for user, events in inter.items():
        assert [item for item, _ in events] == expected[user]
        assert [t for _, t in events] == list(range(len(events)))
    assert result["users"] == 40 and result["interactions"] == sum(map(len, s3rec.values()))
    assert "checked against user_sequence.txt" in result["tokens"]
    first = (tmp_path / "sports.inter").read_text().splitlines()[:2]
    assert first == ["user_id:token\titem_id:token\ttimestamp:float", "AIXZKN4ACSKI\t1881509818\t0"]


def test_toys_p5_datamaps_are_aligned_to_the_s3rec_numbering(tmp_path):
    result = convert_s3rec.convert(DATA / "toys", tmp_path, "toys")
    assert "aligned to Toys_and_Games.txt" in result["tokens"]
    inter = read_inter(tmp_path / "toys.inter")
    reference = user_sequences(DATA / "toys" / "user_sequence.txt")
    assert {u: [i for i, _ in events] for u, events in inter.items()} == reference
    s3rec_users = list(user_sequences(DATA / "toys" / "Toys_and_Games.txt"))
    assert len(inter) == len(s3rec_users) == 30
    # the S3-Rec order and sequence lengths are kept (S3-Rec user 1 is reviewer A1VXOAVRGKGEAK)
    s3rec = user_sequences(DATA / "toys" / "Toys_and_Games.txt")
    assert [len(v) for v in inter.values()] == [len(v) for v in s3rec.values()]
    assert next(iter(inter)) == "A1VXOAVRGKGEAK"


def test_alignment_rejects_different_data(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DATA / "toys", src)
    lines = (src / "sequential_p5ids.txt").read_text().splitlines()
    parts = lines[3].split()
    parts[1], parts[2] = parts[2], parts[1]  # one user's order differs
    lines[3] = " ".join(parts)
    (src / "sequential_p5ids.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(convert_s3rec.S3RecFormatError, match="cannot align"):
        convert_s3rec.convert(src, tmp_path / "out", "toys")
    assert not (tmp_path / "out" / "toys.inter").exists()


def test_user_sequence_mismatch_is_an_error(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DATA / "sports", src)
    lines = (src / "user_sequence.txt").read_text().splitlines()
    lines[0] = lines[0] + " B000EXTRA1"
    (src / "user_sequence.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(convert_s3rec.S3RecFormatError, match="differ"):
        convert_s3rec.convert(src, tmp_path / "out", "sports")


def test_numeric_ids_without_datamaps(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DATA / "sports" / "Sports_and_Outdoors.txt", src)
    result = convert_s3rec.convert(src, tmp_path / "out", "s")
    assert result["tokens"].startswith("S3-Rec integer ids")
    inter = read_inter(tmp_path / "out" / "s.inter")
    assert inter["1"][:3] == [("1", 0.0), ("2", 1.0), ("3", 2.0)]
    with pytest.raises(convert_s3rec.S3RecFormatError, match="no datamaps"):
        convert_s3rec.convert(src, tmp_path / "out2", "s", ids="asin")
    numeric = convert_s3rec.convert(DATA / "sports", tmp_path / "out3", "s", ids="numeric")
    assert numeric["tokens"].endswith("(--ids numeric)")


def test_recbole_leave_one_out_targets_are_the_last_two_s3rec_items(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from reveal_recbole.config import Config
    from reveal_recbole.pipeline import prepare_data

    convert_s3rec.convert(DATA / "sports", tmp_path / "sports", "sports")
    config = Config(
        model="SASRec",
        dataset="sports",
        config_dict={
            "data_path": str(tmp_path), "checkpoint_dir": str(tmp_path / "saved"),
            "save_dataset": False, "save_dataloaders": False, "MAX_ITEM_LIST_LENGTH": 50,
        },
    )
    dataset, _, valid, test = prepare_data(config)
    inter = read_inter(tmp_path / "sports" / "sports.inter")
    for loader, offset in ((valid, 2), (test, 1)):
        data = loader._dataset.inter_feat
        users = dataset.id2token("user_id", data["user_id"].numpy())
        targets = dataset.id2token("item_id", data["item_id"].numpy())
        assert len(users) == len(inter)
        for user, target in zip(users, targets):
            assert target == inter[user][-offset][0]


def test_sequence_file_found_among_other_txt_files(tmp_path):
    src = tmp_path / "sports"
    shutil.copytree(DATA / "sports", src)
    (src / "item_keywords_idgenrec.txt").write_text("1 waterproof zipper\n")
    with pytest.raises(convert_s3rec.S3RecFormatError, match="name it with --sequences"):
        convert_s3rec.find_s3rec_file(src)
    (src / "Sports_and_Outdoors_item2attributes.json").write_text("{}")
    assert convert_s3rec.find_s3rec_file(src) == src / "Sports_and_Outdoors.txt"


@pytest.mark.skipif(not (SHARED / "amazon_sports_5core_2014").is_dir(), reason="shared real data absent")
@pytest.mark.parametrize(
    "folder, name, counts",
    [
        ("amazon_sports_5core_2014", "sports", (35598, 18357, 296337)),
        ("amazon_beauty_5core_2014", "beauty", (22363, 12101, 198502)),
        ("amazon_toys_5core_2014", "toys", (19412, 11924, 167597)),
    ],
)
def test_full_files_match_published_counts(tmp_path, folder, name, counts):
    result = convert_s3rec.convert(SHARED / folder, tmp_path, name)
    assert (result["users"], result["items"], result["interactions"]) == counts
    assert "checked against user_sequence.txt" in result["tokens"]
