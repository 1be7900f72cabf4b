"""Score matrices each model holds while it ranks the catalogue: measured against its ``eval_score_buffers``.

``ranking.size_eval_batch`` sizes the evaluation batch so ``users x items x eval_score_buffers`` float32
fit ``eval_score_budget_mb``; a model that holds more per user than it declares overruns the budget on a
large catalogue (a 1M-item batch of 256 users is 1 GB per score matrix). Per model, in a fresh process, on
``bench_scale``'s random catalogue: ``full_sort_predict`` without gradients (after a warm-up call) for
``--batch`` users and for twice as many; the peak resident growth of each call (sampled every millisecond,
large buffers unmapped when freed; min over ``--repeats``) splits into a part per user, in ``(users, items)``
float32 matrices (what ``eval_score_buffers`` must cover: the difference of the two sizes), and a part
that does not grow with the batch (item tables and blocks, MB), and seconds per batch (min / median).
The part per user also holds the sequence encoding (``users x length x width`` activations), which does not
grow with the catalogue: below about 50k items it is most of it, so read the matrices at 100k items or more.
MISSRec clusters its interests at its first scoring: ``interest_ratio`` 0.05 here (the clusters' number
does not change what ranking holds; at the default 0.5 the clustering alone takes 10 minutes at 100k items).

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_memory.py --items 100000 --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/bench_eval_memory.py --items 20000 100000 --models MISSRec M3SRec

Results: a markdown table on stdout and ``<out>/eval-memory-cpu.md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ranking import map_large_allocations, peak_host_growth  # noqa: E402
from bench_scale import config_for, fixed_batches, make_catalogue  # noqa: E402

from reveal_recbole.pipeline import prepare_run  # noqa: E402
from reveal_recbole.registry import get_model  # noqa: E402

MODELS = ["SASRec", "SASRecREVEAL", "M3SRec", "MISSRec", "UniSRec", "SASRecF"]
SCORE_BYTES = 4
QUICKER = {"MISSRec": {"interest_ratio": 0.05}}  # its clustering, not its ranking


def peak_growth(model, batch, repeats: int) -> tuple[int, list[float]]:
    """Least peak resident growth over ``repeats`` scorings of ``batch`` (bytes), and each call's seconds."""
    growth, seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        growth.append(peak_host_growth(lambda: model.full_sort_predict(batch)))
        seconds.append(time.perf_counter() - start)
    return min(growth), seconds


def probe(model: str, root: Path, n_items: int, dims: tuple[int, int], users: int, repeats: int) -> dict:
    """One model's memory per ranked user (score matrices) and per batch (MB), in this process."""
    torch.set_num_threads(1)
    map_large_allocations()
    name = make_catalogue(root, n_items, dims)
    overrides = {"train_batch_size": 2 * users, **QUICKER.get(model, {})}
    run = prepare_run(config_for(model, name, root, "cpu", overrides))
    batch = fixed_batches(run.train_data, 1, run.config["device"])[0]
    if len(batch) < 2 * users:
        raise SystemExit(f"{model}: the first training batch has {len(batch)} sequences, fewer than {2 * users}")
    network = run.model.eval()
    with torch.no_grad():
        network.full_sort_predict(batch[:users])  # warm-up: cached tables, allocator
        small, seconds = peak_growth(network, batch[:users], repeats)
        large, _ = peak_growth(network, batch[:2 * users], repeats)
    per_user = max(large - small, 0) / users
    return {"model": model, "items": run.dataset.item_num - 1, "users": users,
            "declared": getattr(get_model(model), "eval_score_buffers", 1),
            "per_user_matrices": per_user / (run.dataset.item_num * SCORE_BYTES),
            "fixed_mb": max(small - per_user * users, 0) / 2**20,
            "matrices_at_batch": small / (users * run.dataset.item_num * SCORE_BYTES), "seconds": seconds}


def table(rows: list[dict]) -> str:
    """One line per (catalogue, model); time also as a ratio to SASRec's median in the same run, when it ran."""
    lines = ["| items | model | declared eval_score_buffers | measured per user, score matrices | "
             "not per user, MB | all, at --batch users, score matrices | ms per batch (min / median) | "
             "ratio to SASRec (median) |", "|---|---|---|---|---|---|---|---|"]
    baseline = {row["items"]: statistics.median(row["seconds"]) for row in rows
                if row["model"] == "SASRec" and "seconds" in row}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['items']:,} | {row['model']} | - | error: {row['error'][:80]} | - | - | - | - |")
            continue
        ms = [s * 1000 for s in row["seconds"]]
        ratio = "-"
        if row["items"] in baseline:
            ratio = f"{statistics.median(row['seconds']) / baseline[row['items']]:.2f}x"
        lines.append(f"| {row['items']:,} | {row['model']} | {row['declared']} | {row['per_user_matrices']:.2f} | "
                     f"{row['fixed_mb']:.0f} | {row['matrices_at_batch']:.2f} | "
                     f"{min(ms):.0f} / {statistics.median(ms):.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100000])
    parser.add_argument("--dims", type=int, nargs=2, default=[512, 384])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=256, help="users per ranking batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reveal-bench-scale",
                        help="where the random catalogues are (bench_scale.py's, shared)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the child process: one model
    args = parser.parse_args()
    dims = tuple(args.dims)
    if args.probe:
        print(json.dumps(probe(args.probe, args.root, args.items[0], dims, args.batch, args.repeats)))
        return
    rows = []
    for n_items in args.items:
        make_catalogue(args.root, n_items, dims)
        for model in args.models:
            command = [sys.executable, __file__, "--probe", model, "--items", str(n_items), "--dims", *map(str, dims),
                       "--batch", str(args.batch), "--repeats", str(args.repeats), "--root", str(args.root)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                rows.append({"model": model, "items": n_items, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval-memory-cpu.md").write_text(text + "\n")
    (args.out / "eval-memory-cpu.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
