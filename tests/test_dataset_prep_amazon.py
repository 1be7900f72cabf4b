"""dataset_prep/convert_amazon.py: raw Amazon 2014/2018 formats, k-core, order, keywords, image URLs."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from dataset_prep import convert_amazon
from dataset_prep.common import read_inter

ROOT = Path(__file__).resolve().parents[1]

S3REC_SPORTS = ROOT / "tests" / "data" / "s3rec" / "sports"
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
DAY = 86400
T0 = 1_300_000_000 // DAY * DAY


def review(user, item, t, text="", summary="", full=True):
    """A review line as in reviews_<Category>_5.json.gz (2014; 2018 has the same keys used here)."""
    if not full:  # just the keys the k-core needs (the full-size test writes 300k of these)
        return {"reviewerID": user, "asin": item, "unixReviewTime": int(t)}
    return {
        "reviewerID": user, "asin": item, "reviewerName": "J. Doe", "helpful": [0, 0],
        "reviewText": text, "overall": 5.0, "summary": summary, "unixReviewTime": int(t),
        "reviewTime": "01 1, 2014",
    }


def write_lines(path: Path, lines: list[str]) -> Path:
    data = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def core_block():
    """6 users x 7 items, user u skips item u: every user has 6 reviews, every item at least 5."""
    users = [f"AUSER{u}" for u in range(6)]
    items = [f"B00ITEM00{i}" for i in range(7)]
    rows = []
    for u, user in enumerate(users):
        for i, item in enumerate(items):
            if i != u:
                rows.append((user, item))
    return users, items, rows


# ----------------------------------------------------------------------------- 2014 format
def make_2014(tmp_path: Path) -> tuple[Path, Path]:
    users, items, rows = core_block()
    lines = []
    for user, item in rows:
        i = int(item[-1])
        # per user: items 0..6 on days u-th pattern; items 1 and 2 share a day (tie)
        day = {0: 0, 1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5}[i]
        text = "Great product. It is waterproof and the waterproof zipper works." if i == 3 else "Great product, works."
        if i == 4:
            text = "Great blade, very sharp blade and a sturdy handle."
        lines.append(review(user, item, T0 + day * DAY, text=text, summary="Great"))
    # file order: user AUSER0 lists item 2 before item 1 (same day) -> 2 must come first
    first = [k for k, r in enumerate(lines) if r["reviewerID"] == "AUSER0"]
    a = next(k for k in first if r_item(lines[k]) == "B00ITEM001")
    b = next(k for k in first if r_item(lines[k]) == "B00ITEM002")
    lines[a], lines[b] = lines[b], lines[a]
    # noise: a user with 4 reviews, an item with 3 reviews (from core users)
    lines += [review("ANOISE", item, T0, "meh") for item in items[:4]]
    lines += [review(user, "B0NOISE001", T0 + 9 * DAY, "meh") for user in users[:3]]
    random.Random(0).shuffle(lines)  # file order across users is arbitrary; within AUSER0 fixed below
    lines.sort(key=lambda r: (r["reviewerID"] != "AUSER0"))  # keep AUSER0's tie order (stable sort)
    reviews = write_lines(tmp_path / "reviews_Sports_and_Outdoors_5.json.gz", [json.dumps(r) for r in lines])

    meta = []
    for i, item in enumerate(items[:6]):
        record = {
            "asin": item,
            "title": f"Men's Trail Knife &amp; Sheath {i}",
            "price": 12.5,
            "imUrl": f"http://ecx.images-amazon.com/images/I/{i}abc._SY300_.jpg",
            "related": {"also_bought": ["B00ITEM000"]},
            "salesRank": {"Sports &amp; Outdoors": 1000 + i},
            "categories": [["Clothing, Shoes & Jewelry", "Men"], ["Sports & Outdoors", "Hunting & Fishing", "Knives"]],
            "brand": "Buck",
        }
        if i == 5:
            del record["imUrl"]
            record["categories"] = [["Sports & Outdoors"]]
        meta.append(repr(record))  # Python literal, as the 2014 meta files are
    # an evil line for item 6: literal_eval must refuse it, nothing may run
    meta.append("{'asin': 'B00ITEM006', 'title': __import__('os').system('touch PWNED')}")
    meta.append(repr({"asin": "B0OTHER999", "title": "not in the reviews"}))
    return reviews, write_lines(tmp_path / "meta_Sports_and_Outdoors.json.gz", meta)


def r_item(record):
    return record["asin"]


def test_2014_reviews_and_literal_metadata(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reviews, meta = make_2014(tmp_path)
    result = convert_amazon.convert(reviews, tmp_path / "out", "sp", meta=meta, keywords=3, min_df=1)
    assert not (tmp_path / "PWNED").exists()
    assert result["unparseable_meta_lines"] == 1
    assert (result["users"], result["items"], result["interactions"]) == (6, 7, 36)
    assert result["kcore_rounds"] >= 2

    inter = read_inter(tmp_path / "out" / "sp.inter")
    assert set(inter) == {f"AUSER{u}" for u in range(6)}
    # chronological, ties in file order: AUSER0 wrote item 2 before item 1 on the same day
    assert [i for i, _ in inter["AUSER0"]] == [f"B00ITEM00{i}" for i in (2, 1, 3, 4, 5, 6)]
    written = [json.loads(line) for line in gzip.open(reviews, "rt")]
    for user, events in inter.items():
        mine = [(r["unixReviewTime"], n, r["asin"]) for n, r in enumerate(written) if r["reviewerID"] == user]
        assert [i for i, _ in events] == [asin for _, _, asin in sorted(mine) if asin != "B0NOISE001"]
    times = [t for _, t in inter["AUSER0"]]
    assert times[:2] == [T0 + DAY, T0 + DAY + 0.5] and times == sorted(times)

    item_lines = (tmp_path / "out" / "sp.item").read_text().splitlines()
    assert item_lines[0].split("\t") == [
        "item_id:token", "title:token_seq", "categories:token_seq", "brand:token", "description:token_seq",
        "keywords:token_seq",
    ]
    rows = {line.split("\t")[0]: line.split("\t") for line in item_lines[1:]}
    assert rows["B00ITEM000"][1] == "Men's Trail Knife & Sheath 0"
    assert rows["B00ITEM000"][2] == "Sports & Outdoors > Hunting & Fishing > Knives"  # the dataset's root
    assert rows["B00ITEM000"][3] == "Buck"
    assert rows["B00ITEM003"][5].split()[0] == "waterproof"
    assert "blade" in rows["B00ITEM004"][5].split()
    assert "great" not in rows["B00ITEM004"][5].split()  # in every item's reviews: too generic
    assert rows["B00ITEM006"][1:5] == ["", "", "", ""]  # its metadata line was refused

    # training reviews only: each user's last two (items 5 and 6; 4 and 6 for AUSER5) are held out
    reviews_file = (tmp_path / "out" / "sp.reviews").read_text().splitlines()
    assert reviews_file[0] == "item_id\treview" and len(reviews_file) == 1 + 36 - 12  # no noise, no held-out
    assert result["held_out_reviews_unused"] == 12 and result["reviews_from"] == "train"
    assert "B00ITEM003\tGreat. Great product. It is waterproof and the waterproof zipper works." in reviews_file
    assert not any(line.startswith(("B00ITEM005", "B00ITEM006")) for line in reviews_file)
    capped = convert_amazon.convert(reviews, tmp_path / "capped", "sp", keywords=0, reviews_per_item=2)
    assert capped["reviews_written"] == 10  # items 0-4
    every = convert_amazon.convert(reviews, tmp_path / "all", "sp", keywords=0, reviews_from="all")
    assert every["reviews_written"] == 36 and every["held_out_reviews_unused"] == 0

    images = (tmp_path / "out" / "sp.images.tsv").read_text().splitlines()
    assert images[0] == "item_id\timage_urls"
    urls = dict(line.split("\t") for line in images[1:])
    assert urls["B00ITEM000"] == "http://ecx.images-amazon.com/images/I/0abc._SY300_.jpg"
    assert "B00ITEM005" not in urls and "B00ITEM006" not in urls and len(urls) == 5


def test_2014_outputs_byte_for_byte(tmp_path):
    """The whole .item, .reviews and .images.tsv of the 2014 fixture, checked by hand: items in order of
    first appearance (AUSER0 lists 2, 1, 3, 4, 5, 6; item 0 first appears with AUSER1); training reviews
    only (AUSER0-4 hold out items 5 and 6, AUSER5 items 4 and 6, so item 4 keeps 4 reviews and items 5-6
    none); keywords: "great" and "works" are in 5 and 4 of the 5 items with training reviews (> max_df),
    "sturdy" ties with blade, handle and sharp and loses alphabetically; item 6's metadata line was refused."""
    reviews, meta = make_2014(tmp_path)
    convert_amazon.convert(reviews, tmp_path / "out", "sp", meta=meta, keywords=3, min_df=1)
    knives = "Sports & Outdoors > Hunting & Fishing > Knives\tBuck\t"
    assert (tmp_path / "out" / "sp.item").read_bytes().decode() == "".join(line + "\n" for line in [
        "item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token\tdescription:token_seq\tkeywords:token_seq",
        f"B00ITEM002\tMen's Trail Knife & Sheath 2\t{knives}\t",
        f"B00ITEM001\tMen's Trail Knife & Sheath 1\t{knives}\t",
        f"B00ITEM003\tMen's Trail Knife & Sheath 3\t{knives}\twaterproof zipper",
        f"B00ITEM004\tMen's Trail Knife & Sheath 4\t{knives}\tblade handle sharp",
        "B00ITEM005\tMen's Trail Knife & Sheath 5\tSports & Outdoors\tBuck\t\t",
        "B00ITEM006\t\t\t\t\t",
        f"B00ITEM000\tMen's Trail Knife & Sheath 0\t{knives}\t",
    ])
    plain = "Great. Great product, works."
    waterproof = "Great. Great product. It is waterproof and the waterproof zipper works."
    blade = "Great. Great blade, very sharp blade and a sturdy handle."
    expected_reviews = [("2", plain, 5), ("1", plain, 5), ("3", waterproof, 5), ("4", blade, 4), ("0", plain, 5)]
    assert (tmp_path / "out" / "sp.reviews").read_bytes().decode() == "item_id\treview\n" + "".join(
        f"B00ITEM00{item}\t{text}\n" * count for item, text, count in expected_reviews
    )
    assert (tmp_path / "out" / "sp.images.tsv").read_bytes().decode() == "item_id\timage_urls\n" + "".join(
        f"B00ITEM00{i}\thttp://ecx.images-amazon.com/images/I/{i}abc._SY300_.jpg\n" for i in (2, 1, 3, 4, 0)
    )


def test_training_rows_hold_out_each_users_last_two_as_recbole_does():
    users = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    assert convert_amazon.training_rows(users).tolist() == [
        True, True, False, False,  # 4 interactions: train, train, valid, test
        True, False, False,        # 3: train, valid, test
        True, False,               # 2: min(2, n - 1) = 1 held out
        True,                      # 1: nothing to hold out
    ]
    assert convert_amazon.training_rows(np.zeros(0, dtype=np.int64)).tolist() == []


def test_held_out_reviews_reach_no_prompt_keyword_or_critic(tmp_path):
    """A word written only in reviews of validation / test interactions reaches neither the keywords,
    the .reviews file, FVE's initial prompts, nor the critic's request; --reviews-from all lets it through."""
    from reveal_recbole.fve.critic import build_critic_request
    from reveal_recbole.fve.loop import initial_prompts
    from reveal_recbole.fve.select import UNDER_RANKED_POSITIVE
    from reveal_recbole.fve.sources import read_item_texts

    users, items, rows = core_block()
    lines = []
    for user, item in rows:
        day = int(item[-1])  # every user reviews items in id order: the last two are the held-out ones
        text = f"Solid sturdy {item[-1]} build, decent grip."
        if item == "B00ITEM006":  # every user's test target (user u skips item u < 6)
            text = "The zanzibarite finish shines, zanzibarite everywhere."
        elif item == "B00ITEM005" and user != "AUSER5":  # the validation target of users 0-4
            text = "A quokkalike texture, quokkalike again."
        lines.append(json.dumps(review(user, item, T0 + day * DAY, text=text, summary="Fine")))
    raw = write_lines(tmp_path / "reviews.json", lines)

    def everything_fve_reads(reviews_from):
        out = tmp_path / reviews_from
        convert_amazon.main(["--reviews", str(raw), "--out", str(out), "--name", "x", "--keywords", "5",
                             "--min-df", "1", "--reviews-from", reviews_from])
        texts = read_item_texts(out, "x")
        tokens = [f"B00ITEM00{i}" for i in range(7)]
        prompts, keywords = initial_prompts(tokens, texts)
        requests = [
            build_critic_request(t, prompts[t], texts[t].reviews if t in texts else [], {"hit_count": 1},
                                 UNDER_RANKED_POSITIVE, keywords=keywords[t]).messages()
            for t in tokens
        ]
        return {"files": (out / "x.item").read_text() + (out / "x.reviews").read_text(),
                "prompts": json.dumps(prompts), "critic": json.dumps(requests)}

    seen = everything_fve_reads("train")
    for where, text in seen.items():
        assert "zanzibarite" not in text and "quokkalike" not in text, where
    assert "grip" in seen["prompts"] and "grip" in seen["critic"]  # training reviews do get through
    leaked = everything_fve_reads("all")  # the old behaviour, on request: the held-out reviews leak everywhere
    assert all("zanzibarite" in text and "quokkalike" in text for text in leaked.values())


# ----------------------------------------------------------------------------- 2018 format
def test_2018_json_metadata_duplicates_and_require_image(tmp_path):
    users, items, rows = core_block()
    lines = [json.dumps(review(u, i, T0 + n)) for n, (u, i) in enumerate(rows)]
    # a repeated review of (AUSER1, item 0), later: the earliest is kept
    lines.append(json.dumps(review("AUSER1", "B00ITEM000", T0 + 10**6)))
    reviews = write_lines(tmp_path / "Industrial_and_Scientific_5.json", lines)
    meta = []
    for i, item in enumerate(items):
        record = {
            "category": ["Industrial &amp; Scientific", "Lab", "<span class='x'>Pipettes</span>"],
            "tech1": "", "description": ["<b>Precise</b> pipette.", "Autoclavable."], "fit": "",
            "title": f"Pipette {i}", "also_buy": [], "brand": "Eppendorf", "feature": [], "rank": [],
            "also_view": [], "main_cat": "Industrial & Scientific", "similar_item": "", "date": "",
            "price": "$9.99", "asin": item,
            "imageURL": [f"https://images-na.ssl-images-amazon.com/images/I/{i}._SS40_.jpg"],
            "imageURLHighRes": [f"https://images-na.ssl-images-amazon.com/images/I/{i}.jpg",
                                f"https://images-na.ssl-images-amazon.com/images/I/{i}b.jpg"],
        }
        if i == 6:
            record["imageURL"] = record["imageURLHighRes"] = []
        meta.append(json.dumps(record))
        if i == 0:
            meta.append(json.dumps({**record, "title": "a later duplicate record"}))
    meta_path = write_lines(tmp_path / "meta_Industrial_and_Scientific.json.gz", meta)

    result = convert_amazon.convert(reviews, tmp_path / "a", "sci", meta=meta_path, keywords=0)
    assert result["duplicates_dropped"] == 1
    assert (result["users"], result["items"], result["interactions"]) == (6, 7, 36)
    inter = read_inter(tmp_path / "a" / "sci.inter")
    assert inter["AUSER1"][0] == ("B00ITEM000", float(T0 + 6))
    rows_ = {r.split("\t")[0]: r.split("\t") for r in (tmp_path / "a" / "sci.item").read_text().splitlines()[1:]}
    assert rows_["B00ITEM000"][1:5] == [
        "Pipette 0", "Industrial & Scientific > Lab > Pipettes", "Eppendorf", "Precise pipette. Autoclavable.",
    ]
    urls = dict(r.split("\t") for r in (tmp_path / "a" / "sci.images.tsv").read_text().splitlines()[1:])
    assert urls["B00ITEM002"].split() == [
        "https://images-na.ssl-images-amazon.com/images/I/2.jpg", "https://images-na.ssl-images-amazon.com/images/I/2b.jpg",
    ]

    # item 6 has no image: dropped first, the users keep 5 reviews each, items 0..5 keep 5 reviewers
    ok = convert_amazon.convert(reviews, tmp_path / "b", "sci", meta=meta_path, keywords=0, require_image=True)
    assert (ok["users"], ok["items"], ok["interactions"], ok["items_with_image"]) == (6, 6, 30, 6)
    # a 6-core: items 0..5 have 5 reviewers, then every user falls below 6: nothing is left
    with pytest.raises(convert_amazon.AmazonFormatError, match="nothing is left"):
        convert_amazon.convert(reviews, tmp_path / "c", "sci", meta=meta_path, keywords=0, k=6)
    assert not (tmp_path / "c" / "sci.inter").exists()


def test_unparseable_review_lines_are_skipped(tmp_path):
    users, items, rows = core_block()
    lines = [json.dumps(review(u, i, T0)) for u, i in rows] + ["not json", json.dumps({"asin": "X"}), ""]
    result = convert_amazon.convert(write_lines(tmp_path / "r.json", lines), tmp_path / "o", "x", keywords=0)
    assert result["skipped_lines"] == 3 and result["interactions"] == 36
    assert not (tmp_path / "o" / "x.images.tsv").exists()  # no metadata, no image list


def test_parse_record_never_evaluates():
    record = convert_amazon.parse_record("{'asin': 'A', 'x': [1, (2, 3)], 'y': None}")
    assert record == {"asin": "A", "x": [1, (2, 3)], "y": None}
    assert convert_amazon.parse_record("{'asin': open('/etc/passwd').read()}") is None
    assert convert_amazon.parse_record("[1, 2]") is None


# ----------------------------------------------------------------------------- k-core vs S3-Rec
def naive_k_core(records: list[tuple[str, str, int]], k: int) -> set[tuple[str, str]]:
    """An independent, plain-Python k-core: keep (user, item) pairs until every count is >= k."""
    pairs = {(u, i) for u, i, _ in records}
    while True:
        users, items = defaultdict(int), defaultdict(int)
        for u, i in pairs:
            users[u] += 1
            items[i] += 1
        kept = {(u, i) for u, i in pairs if users[u] >= k and items[i] >= k}
        if kept == pairs:
            return kept
        pairs = kept


def reviews_from_sequences(sequences: dict[str, list[str]], k: int, seed: int = 0, full: bool = True) -> list[dict]:
    """Reviews equivalent to the sequences, plus noise the k-core filter has to remove.

    Real users: item p on day p // 2 (pairs of items share a day); each user's reviews are
    written latest day first but, within a day, in sequence order (so the converter has to sort
    by time and break ties by file order); users are interleaved at random. Noise:
    users with k - 1 reviews; users with k reviews, one on an item with < k reviews (gone in
    round 2); a noise item reviewed by k users who each lose a singleton item in round 1 (users
    gone in round 2, the item in round 3) and by fewer than k users whose k-th review it is
    (gone in round 4); and repeated reviews of real pairs dated later (dropped as duplicates).
    """
    rng = random.Random(seed)
    real_items = sorted({i for seq in sequences.values() for i in seq})
    per_user = []
    for user, seq in sequences.items():
        days = [p // 2 for p in range(len(seq))]
        slots = sorted(range(len(seq)), key=lambda p: (-days[p], p))
        per_user.append([review(user, seq[p], T0 + days[p] * DAY, full=full) for p in slots])
    noise = []
    for n in range(20):
        noise.append([review(f"NOISEA{n}", i, T0) for i in rng.sample(real_items, k - 1)])
    for n in range(20):
        rows = [review(f"NOISEB{n}", i, T0) for i in rng.sample(real_items, k - 1)]
        noise.append(rows + [review(f"NOISEB{n}", f"NOISEITEMB{n // (k - 1)}", T0 + DAY)])
    for n in range(k):
        rows = [review(f"NOISEC{n}", i, T0) for i in rng.sample(real_items, k - 2)]
        noise.append(rows + [review(f"NOISEC{n}", "NOISEITEMZ", T0), review(f"NOISEC{n}", f"NOISEITEMW{n}", T0)])
    for n in range(min(3, k - 1)):  # fewer than k, so that the noise item falls once the C users go
        rows = [review(f"NOISED{n}", i, T0) for i in rng.sample(real_items, k - 1)]
        noise.append(rows + [review(f"NOISED{n}", "NOISEITEMZ", T0)])
    duplicates = []
    for user, seq in list(sequences.items())[:10]:
        duplicates.append([review(user, seq[0], T0 + 10_000 * DAY)])
    groups = per_user + noise + duplicates
    # interleave the groups at random, keeping each group's own order
    keys = [sorted(rng.random() for _ in group) for group in groups]
    flat = [(key, row) for group, group_keys in zip(groups, keys) for key, row in zip(group_keys, group)]
    flat.sort(key=lambda pair: pair[0])
    return [row for _, row in flat]


def check_against(sequences, expected_pairs, inter):
    expected = {
        user: [i for i in seq if (user, i) in expected_pairs] for user, seq in sequences.items()
    }
    expected = {u: seq for u, seq in expected.items() if seq}
    assert set(inter) == set(expected)
    for user, events in inter.items():
        assert [i for i, _ in events] == expected[user], user
        times = [t for _, t in events]
        assert times == sorted(times) and len(set(times)) == len(times)


def test_k_core_on_a_real_s3rec_extract_matches_an_independent_filter(tmp_path):
    """Fresh-clone version: 40 real Sports users (tests/data), k = 2, checked against naive_k_core."""
    maps = json.loads((S3REC_SPORTS / "datamaps.json").read_text())
    sequences = {
        maps["id2user"][p[0]]: [maps["id2item"][i] for i in p[1:]]
        for p in (line.split() for line in (S3REC_SPORTS / "Sports_and_Outdoors.txt").read_text().splitlines())
    }
    k = 2
    rows = reviews_from_sequences(sequences, k)
    path = write_lines(tmp_path / "reviews.json.gz", [json.dumps(r) for r in rows])
    result = convert_amazon.convert(path, tmp_path / "out", "s", k=k, keywords=0)
    expected = naive_k_core([(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in rows], k)
    assert not any(u.startswith("NOISE") or i.startswith("NOISE") for u, i in expected)
    assert result["interactions"] == len(expected) > 30
    assert result["kcore_rounds"] >= 4
    check_against(sequences, expected, read_inter(tmp_path / "out" / "s.inter"))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "amazon_sports_5core_2014").is_dir(), reason="shared real data absent")
def test_5_core_of_the_full_sports_reviews_reproduces_the_s3rec_file(tmp_path):
    """All of Sports (296,337 reviews) plus noise: the 5-core is exactly the S3-Rec sequences."""
    src = SHARED / "amazon_sports_5core_2014"
    maps = json.loads((src / "datamaps.json").read_text())
    sequences = {
        maps["id2user"][p[0]]: [maps["id2item"][i] for i in p[1:]]
        for p in (line.split() for line in (src / "Sports_and_Outdoors.txt").read_text().splitlines()) if p
    }
    rows = reviews_from_sequences(sequences, 5, full=False)
    path = write_lines(tmp_path / "reviews_Sports_and_Outdoors_5.json", [json.dumps(r) for r in rows])
    result = convert_amazon.convert(path, tmp_path / "out", "sports", k=5, keywords=0, reviews_per_item=0)
    assert (result["users"], result["items"], result["interactions"]) == (35598, 18357, 296337)
    assert result["kcore_rounds"] >= 4 and result["duplicates_dropped"] == 10
    all_pairs = {(u, i) for u, seq in sequences.items() for i in seq}
    check_against(sequences, all_pairs, read_inter(tmp_path / "out" / "sports.inter"))


# ----------------------------------------------------------------------------- bounded memory
def test_metadata_of_items_outside_the_k_core_is_never_parsed_and_only_written_fields_are_kept(tmp_path, monkeypatch):
    """The metadata pass runs after the k-core: a record of an item nobody reviewed (B0OTHER999) or of an
    item the k-core dropped (B0NOISE001) is not even parsed, and a kept item keeps its written fields only."""
    reviews, meta = make_2014(tmp_path)
    lines = gzip.open(meta, "rt").read().splitlines() + [repr({"asin": "B0NOISE001", "title": "dropped"})]
    write_lines(meta, lines)
    parsed_meta, stored = [], {}
    parse = convert_amazon.parse_record
    read_meta = convert_amazon.read_meta

    def spy_parse(line):
        if "reviewerID" not in line:
            parsed_meta.append(line)
        return parse(line)

    def spy_read_meta(path, wanted, keep):
        records, bad = read_meta(path, wanted, keep)
        stored.update(records)
        return records, bad

    monkeypatch.setattr(convert_amazon, "parse_record", spy_parse)
    monkeypatch.setattr(convert_amazon, "read_meta", spy_read_meta)
    result = convert_amazon.convert(reviews, tmp_path / "out", "sp", meta=meta, keywords=3, min_df=1)
    assert result["items"] == 7 and len(parsed_meta) == 7  # items 0-5 and item 6's refused line
    assert not any("B0OTHER999" in line or "B0NOISE001" in line for line in parsed_meta)
    assert sorted(stored) == [f"B00ITEM00{i}" for i in range(6)]
    assert all(isinstance(record, convert_amazon.ItemMeta) for record in stored.values())
    assert stored["B00ITEM000"].image_urls == ("http://ecx.images-amazon.com/images/I/0abc._SY300_.jpg",)


def reference_keywords(documents, top_k, min_df, max_df):
    """The documented TF-IDF keywords, computed plainly from per-item word sets."""
    reviews, rf = defaultdict(int), defaultdict(lambda: defaultdict(int))
    for item, text in documents:
        reviews[item] += 1
        for word in set(convert_amazon.WORD_PATTERN.findall(text.lower())) - convert_amazon.STOP_WORDS:
            rf[item][word] += 1
    df = defaultdict(int)
    for words in rf.values():
        for word in words:
            df[word] += 1
    n = len(reviews)
    chosen = {}
    for item, words in rf.items():
        scored = [
            (-(1 + np.log(count)) * (np.log((1 + n) / (1 + df[word])) + 1), word) for word, count in words.items()
            if min_df <= df[word] <= max_df * n and count >= min(2, reviews[item])
        ]
        if scored:
            chosen[f"I{item}"] = [word for _, word in sorted(scored)[:top_k]]
    return chosen


def test_review_word_counts_store_each_distinct_pair_once_and_give_the_documented_keywords():
    rng = random.Random(3)
    vocabulary = [f"{a}{b}{c}" for a in "kpt" for b in "aeiou" for c in "lmnrs"]
    documents = [(item, " ".join(rng.choices(vocabulary[: 5 + 5 * item], k=rng.randint(0, 12))))
                 for item in range(12) for _ in range(rng.randint(1, 30))]
    documents += [(0, "Zygote zygote, the zygote.")] * 500  # one item's word, repeated in 500 reviews
    counts = convert_amazon.ReviewWordCounts(n_items=12, buffer_size=16)  # merged many times over
    for item, text in documents:
        counts.add(item, text)
    keywords = counts.keywords([f"I{i}" for i in range(12)], top_k=4, min_df=1, max_df=0.9)

    distinct = {(item, word) for item, text in documents for word in convert_amazon.WORD_PATTERN.findall(text.lower())
                if word not in convert_amazon.STOP_WORDS}
    assert sum(map(len, counts.keys)) == len(distinct)  # not one per (review, word): 500 zygote reviews, one pair
    assert len(counts.keys[0]) == len({word for item, word in distinct if item == 0})  # a block per item here
    assert counts.counts[0][np.searchsorted(counts.keys[0], counts.vocabulary["zygote"])] == 500
    assert keywords == reference_keywords(documents, 4, 1, 0.9) and keywords["I0"][0] == "zygote"


def test_a_failed_conversion_leaves_the_earlier_outputs_and_no_new_file(tmp_path, monkeypatch):
    reviews, meta = make_2014(tmp_path)
    out = tmp_path / "out"
    convert_amazon.convert(reviews, out, "sp", meta=meta, keywords=3, min_df=1)
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def broken_metadata(record, max_description_chars):  # .inter and .reviews are staged by then
        raise OSError("disk full")

    monkeypatch.setattr(convert_amazon.ItemMeta, "from_record", broken_metadata)
    with pytest.raises(OSError, match="disk full"):
        convert_amazon.convert(reviews, out, "sp", meta=meta, keywords=0, reviews_from="all")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no mix, no temporary file left
    assert sorted(before) == ["sp.images.tsv", "sp.inter", "sp.item", "sp.reviews"]


@pytest.mark.slow  # a fresh interpreter importing the package: 3-12 s
def test_a_killed_conversion_leaves_no_finished_looking_output(tmp_path):
    """SIGKILL in the metadata pass, after .inter and .reviews were written: only hidden temporary files remain."""
    reviews, meta = make_2014(tmp_path)
    out = tmp_path / "out"
    script = (
        "import os, signal, sys; from pathlib import Path; from dataset_prep import convert_amazon\n"
        "convert_amazon.read_meta = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "convert_amazon.convert(Path(sys.argv[1]), Path(sys.argv[2]), 'sp', meta=Path(sys.argv[3]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(reviews), str(out), str(meta)], cwd=ROOT,
                          capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = sorted(path.name for path in out.iterdir())
    assert left and all(name.startswith(".") and name.endswith(".tmp") for name in left), left
