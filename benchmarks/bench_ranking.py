"""Per-batch cost of ranking one ``(B, n_items)`` full-sort score batch: the code before issue 19
(scores copied to the host, int64 keys, a full numpy sort) against ``reveal_recbole.ranking``
(on the scores' device: comparisons and sums for the ranks, ``torch.topk`` for the lists).

    OMP_NUM_THREADS=1 python benchmarks/bench_ranking.py --items 20000,100000 --batch 256 --repeats 5
    python benchmarks/bench_ranking.py --items 20000,100000,1000000 --device cuda

Two uses are timed: the buckets' target ranks (``target_ranks``) and one FVE feedback batch
(``RankFeedbackAccumulator.update``: ranks and the top-50 lists). "Before" is that code as it
stood at git revision ``--before``, read with ``git show`` (no copy kept here); rows where both
agree on every rank are marked ``=``. Peak host memory is the growth of the process's resident
set during one call (sampled every 1 ms, large allocations unmapped when freed); on CUDA also
torch's peak allocated memory beyond the scores.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

from reveal_recbole.fve.feedback import RankFeedbackAccumulator
from reveal_recbole.ranking import target_ranks

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


def before_module(revision: str) -> types.ModuleType:
    """``reveal_recbole.fve.feedback`` as it stood at ``revision``."""
    source = subprocess.run(["git", "show", f"{revision}:reveal_recbole/fve/feedback.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("feedback_before")
    sys.modules[module.__name__] = module  # its dataclasses look their module up there
    exec(compile(source, f"{revision}:feedback.py", "exec"), module.__dict__)  # noqa: S102 (our own history)
    return module


def map_large_allocations() -> None:
    """glibc's mallopt(M_MMAP_THRESHOLD, 128 KiB): large buffers are mapped and unmapped each time,
    not kept in the heap after the warm-up, so the resident set shows every call's temporaries."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def peak_host_growth(call) -> int:
    """Peak resident-set growth during ``call()``, sampled from a thread every millisecond."""
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - start


def measure(call, repeats: int, device: torch.device) -> dict:
    call()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    host = peak_host_growth(call)
    device_peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"min": min(seconds), "median": statistics.median(seconds), "host_mb": host / 2**20,
            "device_mb": None if device_peak is None else device_peak / 2**20}


def cells(result: dict) -> str:
    device = "" if result["device_mb"] is None else f" / {result['device_mb']:,.0f}"
    return f"{result['min']:.3f} / {result['median']:.3f} | {result['host_mb']:,.0f}{device}"


def bench_catalogue(n_items: int, args, device: torch.device, before: types.ModuleType) -> None:
    """Print one table row per use for a random ``(args.batch, n_items)`` score batch."""
    generator = torch.Generator(device=device).manual_seed(n_items)
    scores = torch.randn(args.batch, n_items, generator=generator, device=device)
    scores[:, 0] = float("-inf")  # RecBole's padding column
    rows = torch.arange(args.batch, device=device)
    targets = torch.randint(1, n_items, (args.batch,), generator=generator, device=device)
    same = torch.equal(before.target_ranks(scores, rows, targets).cpu(), target_ranks(scores, rows, targets).cpu())
    old_feedback = before.RankFeedbackAccumulator(n_items, 10, 50)
    new_feedback = RankFeedbackAccumulator(n_items, 10, 50)
    uses = {
        "buckets: target ranks": (lambda: before.target_ranks(scores, rows, targets).cpu(),
                                  lambda: target_ranks(scores, rows, targets).cpu()),
        "FVE feedback: ranks + top-50": (lambda: old_feedback.update(scores, targets),
                                         lambda: new_feedback.update(scores, targets)),
    }
    for use, (old, new) in uses.items():
        was, now = measure(old, args.repeats, device), measure(new, args.repeats, device)
        print(f"| {n_items:,} | {use} | {cells(was)} | {cells(now)} | {was['min'] / now['min']:.1f}x "
              f"| {'=' if same else 'differ'} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="20000,100000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=256, help="users per score batch (B)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--before", default="ed3bfd5", help="git revision of the code before issue 19")
    args = parser.parse_args(argv)
    map_large_allocations()
    device, before = torch.device(args.device), before_module(args.before)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; B = {args.batch}; seconds min / median of {args.repeats}; peak MB host (/ device)\n")
    print("| items | use | before: s | before: MB | now: s | now: MB | speed-up (min) | same ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for n_items in (int(n) for n in args.items.split(",")):
        bench_catalogue(n_items, args, device, before)
    print(f"\n{' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
