"""Peak memory and wall time of ``dataset_prep/convert_amazon.py`` on a generated Amazon 2018-format file pair.

The full 2018/2023 category files (tens of millions of reviews, millions of metadata records)
are what users convert; this generates a file pair of chosen size in their format and runs the
converter on it in a subprocess, the baseline (the converter and ``dataset_prep/common.py`` of
``--baseline-rev``, default: the last commit before the converter streamed) and the current one,
one run each, and reports each run's own peak RSS (``os.wait4``) and wall time, and whether the
two produced byte-identical outputs.

The generated pair (cached under ``--dir`` by its parameters):

* reviews (``<Category>_5.json.gz`` layout, JSON lines): ``--reviews`` rows of ``--users``
  reviewers and ``--items`` items, both drawn with log-normal popularity (so the 5-core drops
  some), days over ten years, texts of about ``--words`` words from a Zipf-like vocabulary of
  ``--vocabulary`` words plus a few words of the item's own;
* metadata (``meta_<Category>.json.gz``, JSON lines): ``--meta-items`` records (the reviewed
  items and items nobody reviewed, as in the real files), each with what a 2018 record holds:
  title, category path, brand, description and feature lists, ``also_buy``/``also_view`` lists
  of 40 ASINs, rank, price and image URLs.

    python benchmarks/bench_convert.py                                   # 2M reviews, baseline and current
    python benchmarks/bench_convert.py --reviews 200000 --items 20000 --users 40000 --meta-items 40000
    python benchmarks/bench_convert.py --skip-baseline --results benchmarks/results/convert.md
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "ed3bfd52b78261b836ebbb1c9dbbac4c61bc8f74"  # convert_amazon.py before it streamed
SECONDS = re.compile(r"seconds ([0-9.]+)$")  # the converter's own time, last in its summary line
OUTPUTS = (".inter", ".item", ".reviews", ".images.tsv")
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def popularity(rng: np.random.Generator, n: int) -> np.ndarray:
    weights = rng.lognormal(0.0, 1.2, n)
    return weights / weights.sum()


def make_vocabulary(rng: np.random.Generator, size: int) -> np.ndarray:
    words: set[str] = set()
    while len(words) < size:
        length = int(rng.integers(3, 10))
        words.add("".join(LETTERS[rng.integers(0, 26, length)]))
    return np.array(sorted(words), dtype=object)


def generate(folder: Path, reviews: int, items: int, users: int, meta_items: int, words: int, vocabulary: int,
             seed: int) -> tuple[Path, Path]:
    """Write (or reuse) the reviews and metadata files; returns their paths."""
    tag = f"r{reviews}-i{items}-u{users}-m{meta_items}-w{words}-v{vocabulary}-s{seed}"
    review_path, meta_path = folder / f"{tag}_5.json.gz", folder / f"meta_{tag}.json.gz"
    if review_path.exists() and meta_path.exists():
        return review_path, meta_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = make_vocabulary(rng, vocabulary)
    zipf = 1.0 / np.arange(1, vocabulary + 1) ** 1.05
    zipf /= zipf.sum()
    own_words = rng.integers(0, vocabulary, (items, 5))
    asins = [f"B{n:09d}" for n in range(meta_items)]
    reviewed = rng.permutation(meta_items)[:items]  # which catalogue items have reviews
    chunk = 100_000
    with gzip.open(review_path.with_suffix(".tmp"), "wt", encoding="utf-8", compresslevel=1) as handle:
        user_p, item_p = popularity(rng, users), popularity(rng, items)
        for begin in range(0, reviews, chunk):
            n = min(chunk, reviews - begin)
            user, item = rng.choice(users, n, p=user_p), rng.choice(items, n, p=item_p)
            days = rng.integers(0, 3650, n)
            lengths = rng.poisson(words, n) + 1
            drawn = vocab[rng.choice(vocabulary, int(lengths.sum()), p=zipf)]
            ends = np.cumsum(lengths)
            for k in range(n):
                text = list(drawn[ends[k] - lengths[k]:ends[k]]) + list(vocab[own_words[item[k], :3]])
                unix = 1_200_000_000 + int(days[k]) * 86400
                handle.write(json.dumps({
                    "overall": 5.0, "verified": True, "reviewTime": time.strftime("%m %d, %Y", time.gmtime(unix)),
                    "reviewerID": f"A{user[k]:013d}", "asin": asins[reviewed[item[k]]], "reviewerName": "J. Doe",
                    "reviewText": " ".join(text).capitalize() + ".", "summary": " ".join(text[:3]).capitalize(),
                    "unixReviewTime": unix,
                }) + "\n")
    with gzip.open(meta_path.with_suffix(".tmp"), "wt", encoding="utf-8", compresslevel=1) as handle:
        for n, asin in enumerate(asins):
            picked = vocab[rng.integers(0, vocabulary, 80)]
            handle.write(json.dumps({
                "category": ["Books", "Literature & Fiction", picked[0].title()], "tech1": "",
                "description": [" ".join(picked[:60])], "fit": "", "title": " ".join(picked[60:68]).title(),
                "also_buy": [asins[j] for j in rng.integers(0, meta_items, 40)], "brand": picked[68].title(),
                "feature": [" ".join(picked[70:80])], "rank": f"{n + 1:,} in Books (", "main_cat": "Books",
                "also_view": [asins[j] for j in rng.integers(0, meta_items, 40)], "similar_item": "", "date": "",
                "price": "$9.99", "asin": asin,
                "imageURL": [f"https://images-na.ssl-images-amazon.com/images/I/{asin}._SS40_.jpg"],
                "imageURLHighRes": [f"https://images-na.ssl-images-amazon.com/images/I/{asin}.jpg"],
            }) + "\n")
    review_path.with_suffix(".tmp").rename(review_path)
    meta_path.with_suffix(".tmp").rename(meta_path)
    return review_path, meta_path


def baseline_package(folder: Path, rev: str) -> Path:
    """The baseline's ``dataset_prep`` (converter and helpers) at ``rev``, as an importable package."""
    package = folder / "dataset_prep"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "common.py", "convert_amazon.py"):
        source = subprocess.run(["git", "show", f"{rev}:dataset_prep/{name}"], cwd=ROOT, check=True,
                                capture_output=True).stdout
        (package / name).write_bytes(source)
    return folder


def run_converter(package_root: Path, arguments: list[str]) -> dict:
    """One converter process: its own peak RSS (from wait4), wall time and last output line."""
    command = [sys.executable, str(package_root / "dataset_prep" / "convert_amazon.py"), *arguments]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), str(ROOT)]), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n{text[-2000:]}")
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    return {"peak_mib": usage.ru_maxrss / 1024, "seconds": seconds, "summary": summary,
            "convert_seconds": float(SECONDS.search(summary).group(1)) if SECONDS.search(summary) else None}


def table_row(name: str, run: dict) -> str:
    own = "" if run["convert_seconds"] is None else f"{run['convert_seconds']:.0f}"
    return f"| {name} | {run['peak_mib']:,.0f} | {run['seconds']:.0f} | {own} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=2_000_000, help="review lines (default 2,000,000)")
    parser.add_argument("--items", type=int, default=200_000, help="reviewed items (default 200,000)")
    parser.add_argument("--users", type=int, default=400_000, help="reviewers (default 400,000)")
    parser.add_argument("--meta-items", type=int, default=400_000, help="metadata records (default 400,000)")
    parser.add_argument("--words", type=int, default=40, help="mean words per review text (default 40)")
    parser.add_argument("--vocabulary", type=int, default=50_000, help="distinct words (default 50,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_convert",
                        help="generated files and outputs (default /tmp/bench_convert)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline converter")
    parser.add_argument("--skip-baseline", action="store_true", help="run the current converter only")
    parser.add_argument("--results", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    reviews, meta = generate(args.dir, args.reviews, args.items, args.users, args.meta_items, args.words,
                             args.vocabulary, args.seed)
    print(f"input: {reviews} ({reviews.stat().st_size / 2**20:.0f} MiB), {meta} ({meta.stat().st_size / 2**20:.0f} "
          f"MiB); ready in {time.perf_counter() - start:.0f} s", flush=True)
    runs = {"imports only (`--help`)": run_converter(ROOT, ["--help"])}
    outputs = []
    for name, root in ([] if args.skip_baseline else [(f"baseline ({args.baseline_rev[:7]})", "baseline")]) + [
        ("streaming (this tree)", "current")
    ]:
        out = args.dir / f"out-{root}"
        package = ROOT if root == "current" else baseline_package(args.dir / "baseline", args.baseline_rev)
        runs[name] = run_converter(package, ["--reviews", str(reviews), "--meta", str(meta), "--out", str(out),
                                             "--name", "bench"])
        outputs.append(out)
        print(f"{name}: {runs[name]['peak_mib']:,.0f} MiB, {runs[name]['seconds']:.0f} s", flush=True)
    identical = None
    if len(outputs) == 2:
        identical = all((outputs[0] / f"bench{s}").read_bytes() == (outputs[1] / f"bench{s}").read_bytes()
                        for s in OUTPUTS)

    command = "python benchmarks/bench_convert.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"`{command.strip()}` ({args.reviews:,} reviews of {args.items:,} items by {args.users:,} users, "
        f"{args.meta_items:,} metadata records; one run each, 1 thread)", "",
        "| converter | peak RSS (MiB) | wall (s) | conversion (s, its own count) |", "|---|---:|---:|---:|",
        *(table_row(name, run) for name, run in runs.items()), "",
        f"output: {runs['streaming (this tree)']['summary']}",
    ]
    if identical is not None:
        lines.append(f"outputs byte-identical ({', '.join(OUTPUTS)}): {'yes' if identical else 'NO'}")
    table = "\n".join(lines)
    print(table)
    if args.results:
        args.results.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
