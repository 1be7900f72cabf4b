"""Cost of REVEAL against SASRec as the catalogue grows: per training step, per evaluation batch, memory, checkpoints.

Random catalogues stand in for Amazon-size sets: ``n`` items in clusters, an image and a text
feature per item (cluster centre plus noise, of chosen widths), and users whose sequences walk
through feature neighbourhoods (every item appears; about two interactions per item). Each model
is built once on the same RecBole split and trained on the same batches; variants are timed
interleaved (A, B, C, A, B, C, ...) so machine noise hits them alike, and the table gives min and
median over the repeats and each variant's ratio to SASRec.

    python benchmarks/bench_scale.py                                  # 20k and 100k items, 512+384-d features
    python benchmarks/bench_scale.py --items 100000 --dims 1280 384   # the paper's 1,664-d features
    python benchmarks/bench_scale.py --device cuda --items 20000 100000 1000000

Per catalogue it also measures, each model in a fresh process: peak host memory while the dataset
and model load (above the process after imports), load time, checkpoint size and checkpoint load
time; and on CUDA peak device memory per training step. Results: a markdown table on stdout and
``<out>/scale-<dims>-<device>.json`` and ``.md`` (written after each catalogue) and ``.png`` (ratio to
SASRec vs catalogue size).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reveal_recbole.config import Config
from reveal_recbole.data.features import feature_paths
from reveal_recbole.pipeline import PreparedRun, build_model, build_trainer, prepare_data, prepare_run
from reveal_recbole.trainer import MISSRecTrainer, REVEALTrainer

COMMON = {
    "state": "ERROR", "show_progress": False, "diagnostics_figure": False, "utilisation_per_epoch": False,
    "visual_utilisation": False, "save_resume_points": False, "eval_batch_size": 256, "epochs": 1,
}
VARIANTS = {  # label -> (model, config overrides, trained?)
    "SASRec": ("SASRec", {}, True),
    "SASRecREVEAL": ("SASRecREVEAL", {}, True),
    "SASRecREVEAL feature_width=64": ("SASRecREVEAL", {"feature_width": 64}, True),
    "SASRecREVEAL feature_width=32": ("SASRecREVEAL", {"feature_width": 32}, True),
    "SASRecREVEAL fusion=moe": ("SASRecREVEAL", {"fusion": "moe"}, True),
    "SASRecREVEAL fusion=moe score_with=id": ("SASRecREVEAL", {"fusion": "moe", "score_with": "id"}, True),
    "SASRecREVEAL score_with=id": ("SASRecREVEAL", {"score_with": "id"}, True),
    "SASRecREVEAL avl": ("SASRecREVEAL", {"avl": True}, True),
    "SASRecREVEAL feature_neighbours=False": ("SASRecREVEAL", {"feature_neighbours": False}, True),
    "SASRecREVEAL feature_neighbours": ("SASRecREVEAL", {"feature_neighbours": True}, True),
    "SASRecREVEAL feature_neighbours_width=64": (
        "SASRecREVEAL", {"feature_neighbours": True, "feature_neighbours_width": 64}, True),
    "FeatureKNN": ("FeatureKNN", {}, False),
    "MISSRec": ("MISSRec", {}, True),
    "MISSRec interest_ratio=0.05": ("MISSRec", {"interest_ratio": 0.05}, True),
}
DEFAULT_VARIANTS = ["SASRec", "SASRecREVEAL", "SASRecREVEAL fusion=moe", "SASRecREVEAL avl", "FeatureKNN"]
INTERACTIONS_PER_USER = 10


# ----------------------------------------------------------------------------- the random catalogue
def catalogue_name(n_items: int, dims: tuple[int, int]) -> str:
    return f"scale_{n_items}_{dims[0]}x{dims[1]}"


def make_catalogue(root: Path, n_items: int, dims: tuple[int, int], seed: int = 0) -> str:
    """Write ``<root>/<name>/<name>.inter`` and image/text feature files (once; reused when present)."""
    name = catalogue_name(n_items, dims)
    folder = root / name
    if (folder / f"{name}.inter").is_file():
        return name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clusters = max(8, n_items // 500)
    cluster = rng.integers(0, clusters, n_items)
    tokens = [f"i{i}" for i in range(n_items)]
    for modality, dim in zip(("image", "text"), dims):
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        npy_path, items_path = feature_paths(folder, name, modality)
        array = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32, shape=(n_items, dim))
        for start in range(0, n_items, 65536):  # a chunk at a time: 1M x 1,664 floats is 6.7 GB
            stop = min(start + 65536, n_items)
            array[start:stop] = centres[cluster[start:stop]] + rng.standard_normal((stop - start, dim),
                                                                                   dtype=np.float32)
        array.flush()
        del array
        items_path.write_text("\n".join(tokens) + "\n")
    # sequences walk through neighbourhoods: items ordered by cluster, each user a window of that order
    order = np.argsort(cluster + rng.random(n_items), kind="stable")
    covering = order[: n_items - n_items % INTERACTIONS_PER_USER].reshape(-1, INTERACTIONS_PER_USER)
    extra_users = len(covering)
    starts = rng.integers(0, n_items, extra_users)
    walks = order[(starts[:, None] + rng.integers(0, 50, (extra_users, INTERACTIONS_PER_USER))) % n_items]
    sequences = np.concatenate([covering, walks])
    users = np.repeat(np.arange(len(sequences)), INTERACTIONS_PER_USER)
    frame = pd.DataFrame({
        "user_id:token": "u" + pd.Series(users).astype(str),
        "item_id:token": "i" + pd.Series(sequences.reshape(-1)).astype(str),
        "timestamp:float": np.tile(np.arange(INTERACTIONS_PER_USER, dtype=np.float64), len(sequences)),
    })
    frame.to_csv(folder / f"{name}.inter.part", sep="\t", index=False)
    os.replace(folder / f"{name}.inter.part", folder / f"{name}.inter")
    return name


# ----------------------------------------------------------------------------- building and timing
def config_for(model: str, name: str, root: Path, device: str, overrides: dict) -> Config:
    settings = COMMON | {"data_path": str(root), "checkpoint_dir": str(root / "saved"),
                         "use_gpu": device == "cuda", "gpu_id": "0" if device == "cuda" else ""} | overrides
    return Config(model=model, dataset=name, config_dict=settings)


def fixed_batches(train_data, steps: int, device) -> list:
    batches = []
    for interaction in train_data:
        batches.append(interaction.to(device))
        if len(batches) == steps:
            break
    return batches


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(run, batches, epoch: int) -> float:
    """Seconds per training step: the trainer's own epoch loop (loss, AVL, backward, clipping, optimiser);
    a model's work before each epoch (MISSRec's interest clustering) is left to :func:`time_epoch_setup`."""
    device = run.config["device"]
    epoch_loop = type(run.trainer)._train_epoch
    if isinstance(run.trainer, MISSRecTrainer):
        epoch_loop = REVEALTrainer._train_epoch  # the steps alone
    synchronise(device)
    start = time.perf_counter()
    epoch_loop(run.trainer, batches, epoch)
    synchronise(device)
    return (time.perf_counter() - start) / len(batches)


def time_epoch_setup(run, epoch: int) -> float | None:
    """Seconds of a model's work before every training epoch (MISSRec: clustering every item into interests)."""
    if not isinstance(run.trainer, MISSRecTrainer):
        return None
    device = run.config["device"]
    synchronise(device)
    start = time.perf_counter()
    run.model.discover_interests(epoch)
    synchronise(device)
    return time.perf_counter() - start


def time_evaluation(run, eval_batches) -> tuple[float, float]:
    """Seconds per full-ranking evaluation batch once the item table is built, and seconds to build it.

    An evaluation builds the fused table once (cached until a parameter changes) and scores every
    batch against it: the first batch of a pass pays for the table, the others only score.
    """
    model, device = run.model, run.config["device"]
    model.eval()
    encoder = getattr(model, "item_embedding", None)
    if hasattr(encoder, "clear_cache"):
        encoder.clear_cache()
    seconds = []
    with torch.no_grad():
        for interaction in eval_batches if len(eval_batches) > 1 else eval_batches * 2:  # a second, table cached
            synchronise(device)
            start = time.perf_counter()
            model.full_sort_predict(interaction)
            synchronise(device)
            seconds.append(time.perf_counter() - start)
    per_batch = statistics.median(seconds[1:])
    return per_batch, max(seconds[0] - per_batch, 0.0)


def peak_device_step(run, batch, epoch: int) -> float | None:
    device = run.config["device"]
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    run.trainer._train_epoch([batch], epoch)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure_timings(root: Path, name: str, labels: list[str], args) -> dict:
    # one dataset and split (one copy of the features: frozen tables share its rows), the same batches for all
    data = prepare_data(config_for("SASRecREVEAL", name, root, args.device, {}))
    runs = {}
    for label in labels:
        model, overrides, _ = VARIANTS[label]
        config = config_for(model, name, root, args.device, overrides)
        network = build_model(config, data[1])
        runs[label] = PreparedRun(config, *data, network, build_trainer(config, network))
    device = runs[labels[0]].config["device"]
    batches = fixed_batches(data[1], args.steps, device)
    eval_batches = [batch[0].to(device) for batch, _ in zip(data[2], range(args.eval_batches))]
    train = {label: [] for label in labels if VARIANTS[label][2]}
    setup = {label: [] for label in train if isinstance(runs[label].trainer, MISSRecTrainer)}
    evaluate = {label: [] for label in labels}
    table = {label: [] for label in labels}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not counted
        for label, run in runs.items():
            if label in train:
                seconds = time_training(run, batches, repeat)
                if repeat:
                    train[label].append(seconds)
                if label in setup and repeat:
                    setup[label].append(time_epoch_setup(run, repeat))
            per_batch, table_s = time_evaluation(run, eval_batches)
            if repeat:
                evaluate[label].append(per_batch)
                table[label].append(table_s)
    device_mb = {label: peak_device_step(runs[label], batches[0], args.repeats + 1) for label in train}
    return {"train": train, "eval": evaluate, "table_build": table, "device_peak_mb": device_mb, "epoch_setup": setup,
            "items": runs[labels[0]].train_data._dataset.item_num - 1,
            "interactions": len(runs[labels[0]].train_data._dataset.inter_feat)}


# ----------------------------------------------------------------------------- memory, in a fresh process
def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def probe_load(root: Path, name: str, label: str, device: str) -> dict:
    """Peak host memory and time to load data + model; checkpoint bytes and load time (this process only)."""
    model_name, overrides, _ = VARIANTS[label]
    config = config_for(model_name, name, root, device, overrides)
    before = rss_mb()
    start = time.perf_counter()
    run = prepare_run(config)
    load_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    resident = rss_mb() - before
    buffer = io.BytesIO()
    torch.save({"state_dict": run.model.state_dict(), "config": dict(run.config.final_config_dict)}, buffer)
    start = time.perf_counter()
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=False)
    run.model.load_state_dict(checkpoint["state_dict"])
    checkpoint_load_s = time.perf_counter() - start
    features = getattr(run.dataset, "item_features", {}) or {}
    return {
        "load_peak_mb": peak - before, "resident_mb": resident, "load_s": load_s,
        "checkpoint_mb": buffer.getbuffer().nbytes / 2**20,
        "checkpoint_load_s": checkpoint_load_s,
        "parameters_mb": sum(p.numel() * p.element_size() for p in run.model.parameters()) / 2**20,
        "feature_mb": sum(f.values.numel() * 4 for f in features.values()) / 2**20,
    }


def measure_memory(root: Path, name: str, labels: list[str], device: str) -> dict:
    results = {}
    for label in labels:
        command = [sys.executable, __file__, "--probe", label, "--root", str(root), "--name", name, "--device", device]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            results[label] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------- report
def summary(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def table(results: list[dict], labels: list[str]) -> str:
    lines = [
        "| items | variant | train ms/step min | median | ratio min | ratio median | eval ms/batch min | median "
        "| ratio min | ratio median | table build ms per evaluation | load peak MB | resident MB | feature MB "
        "| load s | checkpoint MB | ckpt load s | device peak MB | per-epoch setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base_train = summary(result["train"]["SASRec"])
        base_eval = summary(result["eval"]["SASRec"])
        for label in labels:
            cells = [f"{result['items']:,}", label]
            if label in result["train"]:
                low, mid = summary(result["train"][label])
                cells += [f"{low * 1e3:.1f}", f"{mid * 1e3:.1f}", f"{low / base_train[0]:.3f}x",
                          f"{mid / base_train[1]:.3f}x"]
            else:
                cells += ["-"] * 4
            low, mid = summary(result["eval"][label])
            cells += [f"{low * 1e3:.1f}", f"{mid * 1e3:.1f}", f"{low / base_eval[0]:.3f}x",
                      f"{mid / base_eval[1]:.3f}x"]
            cells.append(f"{statistics.median(result['table_build'][label]) * 1e3:.0f}")
            memory = result.get("memory", {}).get(label, {})
            if "error" in memory:
                cells += [f"error: {memory['error'][:60]}"] + [""] * 5
            elif memory:
                cells += [f"{memory[key]:.0f}" for key in ("load_peak_mb", "resident_mb", "feature_mb")]
                cells += [f"{memory['load_s']:.1f}", f"{memory['checkpoint_mb']:.1f}",
                          f"{memory['checkpoint_load_s']:.2f}"]
            else:
                cells += ["-"] * 6
            peak = result["device_peak_mb"].get(label)
            cells.append("-" if peak is None else f"{peak:.0f}")
            setup = result.get("epoch_setup", {}).get(label)
            cells.append(f"{statistics.median(setup):.2f}" if setup else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(10, 4))
    items = [r["items"] for r in results]
    for label in labels[1:]:
        if all(label in r["train"] for r in results):
            train_axis.plot(items, [min(r["train"][label]) / min(r["train"]["SASRec"]) for r in results], "o-",
                            label=label)
        eval_axis.plot(items, [min(r["eval"][label]) / min(r["eval"]["SASRec"]) for r in results], "o-", label=label)
    for axis, title in ((train_axis, "training step"), (eval_axis, "evaluation batch")):
        axis.set_xscale("log")
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.set_xlabel("items in the catalogue")
        axis.set_ylabel("time / SASRec's (min of repeats)")
        axis.set_title(title)
    train_axis.legend(fontsize=7)
    eval_axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--dims", type=int, nargs=2, default=[512, 384], metavar=("IMAGE", "TEXT"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=6, help="training batches per timed repeat (batch 256)")
    parser.add_argument("--eval-batches", type=int, default=5, help="evaluation batches (256 users) per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model load/checkpoint probes")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reveal-bench-scale")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line: keep ours out of it
    if args.probe:
        print(json.dumps(probe_load(args.root, args.name, args.probe, args.device)))
        return
    labels = ["SASRec"] + [label for label in args.variants if label != "SASRec"]
    dims = tuple(args.dims)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    header = (f"bench_scale: {dims[0]}-d image + {dims[1]}-d text features, batch 256, {args.steps} steps and "
              f"{args.eval_batches} eval batches per repeat, {args.repeats} repeats (min/median), device {device}, "
              f"torch {torch.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scale-{dims[0]}x{dims[1]}-{args.device}"
    results = []
    for n_items in args.items:
        start = time.perf_counter()
        name = make_catalogue(args.root, n_items, dims)
        made_s = time.perf_counter() - start
        result = measure_timings(args.root, name, labels, args)
        result["catalogue_s"] = made_s
        if not args.no_memory:
            result["memory"] = measure_memory(args.root, name, labels, args.device)
        results.append(result)
        print(f"{n_items:,} items done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        # written after every catalogue: a run stopped at the next, larger one keeps these
        stem.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=1))
        stem.with_suffix(".md").write_text(header + "\n\n" + table(results, labels) + "\n")
    print(header)
    print(table(results, labels))
    figure(results, labels, stem.with_suffix(".png"))
    print(f"written {stem}.json, .md and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
