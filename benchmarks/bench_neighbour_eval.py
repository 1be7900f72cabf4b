"""The feature-neighbour term at evaluation: one ``(users, items)`` similarity buffer vs item blocks.

    OMP_NUM_THREADS=1 python benchmarks/bench_neighbour_eval.py --items 20000 100000 300000

Evaluation adds the term to the scores a block of items at a time (``FeatureNeighbourTerm.in_item_blocks``,
64 MB of similarities at once); training keeps the one-buffer sum, whose buffer autograd needs anyway.
This times both on the same random unit rows (512-d image + 384-d text, 256 users, the last 3 items
as queries), checks they agree, and measures each one's peak resident growth in a fresh process, in
score matrices (``users x items`` float32, the scores themselves not counted): what
``eval_score_budget_mb`` has to hold beside them. Linux only (it reads ``/proc/self/statm``).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from reveal_recbole.model.neighbour_term import FeatureNeighbourTerm

USERS, HIDDEN, DIMS = 256, 64, (512, 384)


def term_and_inputs(n_items: int):
    generator = torch.Generator().manual_seed(0)
    rows = {modality: F.normalize(torch.randn(n_items, dim, generator=generator), dim=1)
            for modality, dim in zip(("image", "text"), DIMS)}
    term = FeatureNeighbourTerm(rows, torch.randint(0, 50, (n_items,), generator=generator), hidden_size=HIDDEN)
    seq_output = torch.randn(USERS, HIDDEN, generator=generator)
    item_seq = torch.randint(1, n_items, (USERS, 50), generator=generator)
    return term, seq_output, item_seq, torch.full((USERS,), 50)


def one_buffer(term, scores, seq_output, item_seq, item_seq_len):
    """The training path's sum (what evaluation did before the item blocks), without gradients."""
    knn = term.similarities(item_seq, item_seq_len, query_scale=F.softplus(term.user_weight(seq_output)))
    return scores.addcmul_(knn, term.item_weights())


def item_blocks(term, scores, seq_output, item_seq, item_seq_len):
    return term.add_to(scores, seq_output, item_seq, item_seq_len)


PATHS = {"one buffer": one_buffer, "item blocks": item_blocks}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_growth(n_items: int, path: str) -> float:
    """Peak resident growth of one evaluation batch over the resident size before it, in score matrices,
    sampled every millisecond (run in a fresh process; freed memory handed back to the OS first)."""
    term, *inputs = term_and_inputs(n_items)
    scores = torch.randn(USERS, n_items)
    with torch.no_grad():
        PATHS[path](term, scores[:2].clone(), inputs[0][:2], inputs[1][:2], inputs[2][:2])  # warm up the kernels
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before, peak, done = resident_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], resident_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        PATHS[path](term, scores, *inputs)
        done.set()
        sampler.join()
    return (max(peak[0], resident_bytes()) - before) / (USERS * n_items * 4)


def timings(n_items: int, repeats: int) -> dict:
    term, *inputs = term_and_inputs(n_items)
    scores = torch.randn(USERS, n_items)
    with torch.no_grad():
        expected = one_buffer(term, scores.clone(), *inputs)
        torch.testing.assert_close(item_blocks(term, scores.clone(), *inputs), expected)
        seconds = {path: [] for path in PATHS}
        for _ in range(repeats):
            for path, run in PATHS.items():
                batch = scores.clone()
                start = time.perf_counter()
                run(term, batch, *inputs)
                seconds[path].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[20000, 100000, 300000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)  # items, path: one fresh-process probe
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(peak_growth(int(args.peak[0]), args.peak[1])))
        return
    print("| items | path | ms/batch min | median | ratio to one buffer (median) | peak growth, score matrices |")
    print("|---|---|---|---|---|---|")
    for n_items in args.items:
        seconds = timings(n_items, args.repeats)
        base = statistics.median(seconds["one buffer"])
        for path, values in seconds.items():
            probe = subprocess.run([sys.executable, __file__, "--peak", str(n_items), path], check=True,
                                   capture_output=True, text=True)
            growth = json.loads(probe.stdout.strip().splitlines()[-1])
            print(f"| {n_items:,} | {path} | {min(values) * 1e3:.0f} | {statistics.median(values) * 1e3:.0f} "
                  f"| {statistics.median(values) / base:.2f}x | {growth:.2f} |", flush=True)


if __name__ == "__main__":
    main()
