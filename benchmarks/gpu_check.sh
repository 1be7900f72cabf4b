#!/usr/bin/env bash
# The GPU check of issue 19, on one CUDA machine, in under 10 minutes (every step runs under `timeout`):
#   a. the card, torch and CUDA versions;
#   b. the `gpu` tests (tests/test_gpu.py: training, resume, best-model reload, AMP + AVL, NCCL DDP on CUDA);
#   c. the scale benchmark on CUDA at 20k, 100k and 1M items (benchmarks/bench_scale.py);
#   d. seconds per training epoch and per validation pass of SASRec and SASRecREVEAL at Sports size
#      (35,598 users, 18,357 items), when the Sports 5-core files are present (optional; skipped otherwise).
# A step that fails or runs out of time is recorded and the next one still runs. Logs and results go to
# ${OUT:-benchmarks/results/gpu_check}: <step>.log each, and summary.txt (one line per step, exit status).
#
#   bash benchmarks/gpu_check.sh
#   SPORTS_SRC=<folder with Sports_and_Outdoors.txt> bash benchmarks/gpu_check.sh   # default: ../shared/data/amazon_sports_5core_2014
#   SPORTS_DIR=<a prepared folder named sports: sports.inter and its feature files> bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# step NAME SECONDS COMMAND...: run COMMAND under timeout, its output to the console and $out/NAME.log
step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local status="${PIPESTATUS[0]}"
  case "$status" in
    0) echo "$name: ok" >> "$summary" ;;
    124 | 137) echo "$name: timed out after ${limit} s" >> "$summary" ;;
    *) echo "$name: failed (exit $status)" >> "$summary" ;;
  esac
}

# a. a few seconds; the limits below add up to 580 s (the kill grace adds 5 s a step)
# (nvidia-smi last: its exit status is the step's)
step devices 20 bash -c 'python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"; nvidia-smi -L'

# b. CUDA start-up, five tiny runs, one spawned NCCL rank, ranking and bf16 extraction: about a minute
step gpu_tests 90 python -m pytest -q -m gpu tests/test_gpu.py tests/test_ranking.py tests/test_fve_extract.py

# c. 20k and 100k items, every variant; then 1M items, SASRec and the default REVEAL model only (tables
#    written after each catalogue, so a timed-out step keeps the sizes it finished)
step bench_scale 150 python benchmarks/bench_scale.py --device cuda --items 20000 100000 --no-memory --out "$out"
step bench_scale_1m 170 python benchmarks/bench_scale.py --device cuda --items 1000000 --no-memory --repeats 3 \
  --variants SASRec SASRecREVEAL --out "$out/1m"

# d. Sports size: the S3-Rec sequences (IDs) with random features of the paper's widths (1,280-d image,
#    384-d text) unless SPORTS_DIR holds a prepared set; epoch times only, no metrics worth reading
sports_src="${SPORTS_SRC:-../shared/data/amazon_sports_5core_2014}"
sports_dir="${SPORTS_DIR:-}"
if [ -z "$sports_dir" ] && [ -f "$sports_src/Sports_and_Outdoors.txt" ]; then
  sports_dir="$work/sports"
  step sports_prepare 30 python dataset_prep/convert_s3rec.py --src "$sports_src" --out "$sports_dir" --name sports
fi
if [ -n "$sports_dir" ] && [ -f "$sports_dir/sports.inter" ]; then
  step sports_epochs 120 python - "$sports_dir" "$work" <<'EOF'
"""One training epoch and one validation pass of SASRec and SASRecREVEAL on Sports, on CUDA."""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reveal_recbole.config import Config
from reveal_recbole.data import write_item_features
from reveal_recbole.pipeline import prepare_run
from reveal_recbole.recbole_seam import quiet_third_party_warnings

quiet_third_party_warnings()

folder = Path(sys.argv[1])
if not (folder / "sports.image.npy").is_file():
    with open(folder / "sports.inter", encoding="utf-8") as handle:
        next(handle)
        items = sorted({line.split("\t")[1] for line in handle})
    rng = np.random.default_rng(0)
    for modality, width in (("image", 1280), ("text", 384)):
        write_item_features(folder, "sports", modality, items, rng.standard_normal((len(items), width), np.float32))
    print(f"random features for {len(items)} items: 1,280-d image, 384-d text (timing only)")


def seconds(work) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return time.perf_counter() - start


os.chdir(sys.argv[2])  # RecBole's log folders and checkpoint names go to the scratch folder
keys = {"data_path": str(folder.resolve().parent), "use_gpu": True, "gpu_id": "0", "epochs": 1,
        "show_progress": False, "state": "WARNING"}
print(f"| model | train epoch (s) | validation pass (s) | {torch.cuda.get_device_name(0)} |")
print("|---|---:|---:|---|")
for model in ("SASRec", "SASRecREVEAL"):
    run = prepare_run(Config(model=model, dataset="sports", config_dict=keys))
    train = seconds(lambda: run.trainer._train_epoch(run.train_data, 0))
    valid = seconds(lambda: run.trainer.evaluate(run.valid_data, load_best_model=False))
    print(f"| {model} | {train:.1f} | {valid:.1f} | {run.dataset.user_num - 1:,} users, {run.dataset.item_num - 1:,} items |")
EOF
else
  echo "sports_epochs: skipped (no Sports files at $sports_src; set SPORTS_SRC or SPORTS_DIR)" | tee -a "$summary"
fi

echo "== summary ($summary)"
cat "$summary"
! grep -q -E "failed|timed out" "$summary"
