"""FVE on the cluttered synthetic world (issue 12): do feedback-rewritten prompts beat plain pooling and random words?

The world is ``properties/dataset/synthetic_clutter.yaml`` (made here by its prepare command when
missing): users like a hue and a shape, and every item image also holds two distractor objects,
so what an image feature describes depends on where the encoder looks. The encoder is the
offline prompt-conditioned ``aligned`` one, its head trained by ``dataset_prep/train_aligner.py``
on its own drawn scenes (seed 9173, never these items; cached under ``--aligner``). For each seed,
SASRecREVEAL (quick budget, :data:`QUICK`) is trained in four arms:

* **FVE**: round 0 (prompts from the metadata template), then ``--rounds`` feedback rounds with
  the offline critic (the phrase the item's reviews name most, e.g. "red star"), each kept only
  on a significant validation gain (``fve.keep``);
* **control**: the same round 0 (copied), then rounds with :class:`RandomReviewWordsCritic`, which
  rewrites exactly the prompts the offline critic would, with as many random words from the item's
  own reviews (from all reviews' words for an item without any);
* **every item**: the same round 0, then one round in which the offline critic rewrites every
  observed item's prompt (``fve_select_fraction: 1``): whether better prompts help at all, apart
  from which items the feedback picks;
* **no prompt**: the aligned encoder with uniform pooling (:class:`UniformPoolingEncoder`: same
  networks, head and 256-d space, the prompt's choice of patches removed), round 0 only. This is the
  honest "plain pooling" control; the prompt-blind EfficientNet (1280-d global pool) differs in more
  than the prompt.

After every round the kept model is evaluated on the test split with all inputs and with the
image masked (reporting only: every keep decision uses validation users). Also reported: the share
of the encoder's patch weight on the item's own region (``synthetic_clutter.regions.tsv``) per
round, and the extraction time of round 0 (every item) against round 1 (only the changed prompts),
and test NDCG@10 / Recall@20 per kind of target (:mod:`reveal_recbole.target_buckets`: all / warm /
cold / head / torso / tail) for every arm after every round. Writes
``<--results>/fve-world-<time>.json`` and ``.md``.

Where FVE should matter (issue 22): ``--world synthetic_clutter_sparse`` is the same world with 3,000
items instead of 500 for the same users and interactions (about 3 interactions per item instead of
20; ``properties/dataset/synthetic_clutter_sparse.yaml``), and ``--cold-share S`` holds that share
of the items out of training in every arm, with ``cold_items: features`` in every arm
(``--cold-items``): a cold item is represented by its features alone, the part FVE changes. The
hold-out is ``cold_item_share``'s (same functions, same items per seed), applied to the file: FVE
builds its dataset without ``create_dataset``, where the package applies ``cold_item_share``. Each
seed's arms then read ``<--work>/<time>/seed-<seed>/data`` (links to the world's files) whose
``.inter`` is held out and whose ``.reviews`` drops the held-out items' reviews (written for the
interactions held out: a new item has none, so its prompt gets no review words).
``--region-items N`` measures region attention on a fixed sample of N items (it embeds every
image with a region once per arm: minutes at 3,000 items).

    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py                 # 3 seeds x 3 rounds
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --seeds 2020 --rounds 1   # quicker
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --config feature_trainable=False avl=False  # the defaults
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --probe   # what the features carry per prompt, no training
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --prompt-template "An item image of a {category}. \
        Item name: {title}. Focus on the overall appearance of the item."   # round 0 without review keywords
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --world synthetic_clutter_sparse --cold-share 0.2 \
        --rounds 1 --region-items 500 --config fve_cache_dir=saved/bench-fve-world/cache   # sparse, cold (issue 22)
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --combine a.json b.json   # one table from two runs' seeds
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --model SASRecF --world synthetic_clutter_sparse \
        --rounds 1 --arms FVE "no prompt"   # a peer's rows: peer (no prompt) and peer + FVE (issue 21)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import yaml

from dataset_prep import make_synthetic, train_aligner
from reveal_recbole.config import Config
from reveal_recbole.data.cold_start import ColdStartSplit, choose_cold_items, hold_out_interactions, leave_out_count
from reveal_recbole.diagnostics import visual_utilisation
from reveal_recbole.fve.aligned import AlignedPromptEncoder, UniformPoolingEncoder
from reveal_recbole.fve.critic import Critic, OfflineCritic, RandomReviewWordsCritic, review_vocabulary
from reveal_recbole.fve.loop import FVERun, FVEState, run_fve
from reveal_recbole.fve.sources import read_reviews
from reveal_recbole.resources import properties_dir
from reveal_recbole.target_buckets import BUCKETS, evaluate_buckets

WORLD = "synthetic_clutter"
ALIGNER_FLAGS = ["--generate", "1500", "--scenes", "0.8"]  # 80 % cluttered scenes, like the world's images
MODEL = "SASRecREVEAL"
# Quick budget: 10 epochs (the dataset yaml's), no per-epoch masked evaluations, nothing but the model saved;
# fine-tuned feature tables and AVL on, as measured in BENCHMARKS.md (the package defaults until 97637ca).
QUICK = {
    "epochs": 10, "stopping_step": 5, "show_progress": False, "state": "WARNING", "utilisation_per_epoch": False,
    "visual_utilisation": False, "diagnostics_figure": False, "save_resume_points": False, "fve_encoder": "aligned",
    "feature_trainable": True, "avl": True,
}
METADATA_ONLY = "An item image of a {category}. Item name: {title}. Focus on the overall appearance of the item."
ARMS = ("no prompt", "FVE", "control", "every item")
WORLDS = ("synthetic_clutter", "synthetic_clutter_sparse")  # dense (about 20 interactions per item), sparse (3)
BUCKET_METRICS = ("ndcg@10", "recall@20")


def world_command(world: str = WORLD) -> list[str]:
    """make_synthetic's arguments from the world's dataset yaml (its one prepare command)."""
    with open(properties_dir() / "dataset" / f"{world}.yaml", encoding="utf-8") as handle:
        command = shlex.split(yaml.safe_load(handle)["prepare_commands"][0])
    return command[command.index("dataset_prep/make_synthetic.py") + 1:]


def prepare_world(data_root: Path, world: str = WORLD) -> Path:
    """The world's folder under ``data_root``, generated (deterministic, seconds) when missing."""
    folder = data_root / world
    if not (folder / f"{world}.inter").is_file():
        make_synthetic.main(world_command(world) + ["--out", str(folder)])
    return folder


def held_out_inter(inter: str, share: float, seed: int, leave_out: int) -> tuple[str, ColdStartSplit]:
    """``.inter`` text without the training interactions of ``share`` of its items, drawn from ``seed``: the
    package's ``cold_item_share`` hold-out (:func:`~reveal_recbole.data.cold_start.hold_out_interactions`) on the
    file itself, which FVE's dataset (built without ``create_dataset``) would otherwise not get."""
    header, *lines = inter.splitlines(keepends=True)
    fields = [name.split(":")[0] for name in header.rstrip("\n").split("\t")]
    rows = [line.rstrip("\n").split("\t") for line in lines]
    users, items = (np.array([row[fields.index(name)] for row in rows]) for name in ("user_id", "item_id"))
    times = np.array([float(row[fields.index("timestamp")]) for row in rows])
    split = hold_out_interactions(users, items, times, choose_cold_items(items, share, seed), leave_out)
    return header + "".join(line for line, keep in zip(lines, split.keep) if keep), split


def without_items(table: str, tokens: set[str]) -> str:
    """A tab-separated file's text (header kept) without the rows whose first column is one of ``tokens``."""
    header, *lines = table.splitlines(keepends=True)
    return header + "".join(line for line in lines if line.split("\t", 1)[0] not in tokens)


def sample_rows(table: str, count: int, seed: int = 0) -> str:
    """A tab-separated file's text (header kept) with ``count`` of its rows, drawn from ``seed``, in file order."""
    header, *lines = table.splitlines(keepends=True)
    chosen = np.sort(np.random.default_rng(seed).choice(len(lines), size=min(count, len(lines)), replace=False))
    return header + "".join(lines[row] for row in chosen)


def linked_world(data_root: Path, dataset: str, out: Path, replaced: dict[str, str]) -> Path:
    """A data root under ``out`` whose ``dataset`` folder links to every file of ``data_root``'s except the
    ``replaced`` ones (file name -> text), which it holds as given."""
    source, folder = data_root / dataset, out / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name not in replaced and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path.resolve())
    for name, text in replaced.items():
        (folder / name).write_text(text, encoding="utf-8")
    return out


def seed_world(data_root: Path, dataset: str, out: Path, seed: int, config: dict, cold_share: float = 0.0,
               region_items: int | None = None, model: str = MODEL) -> Path:
    """The data root the arms of ``seed`` read: ``data_root`` itself, or with ``cold_share`` a linked copy whose
    ``.inter`` holds that share of the items out of training (:func:`held_out_inter`) and whose ``.reviews``
    drops their reviews (written for the interactions held out: a new item has none); with ``region_items``,
    region attention is measured on that many items (a sample, the same for every seed: it embeds every image
    with a region once per arm). A held-out item that is no user's validation or test target stays an item only
    through the ``.item`` file, which :func:`run_arms` then loads (the synthetic worlds list every item there)."""
    folder, replaced = data_root / dataset, {}
    if cold_share:
        leave_out = leave_out_count(Config(model=model, dataset=dataset, config_dict=config))
        inter, split = held_out_inter((folder / f"{dataset}.inter").read_text(encoding="utf-8"), cold_share, seed,
                                      leave_out)
        replaced[f"{dataset}.inter"] = inter
        if (folder / f"{dataset}.reviews").is_file():
            replaced[f"{dataset}.reviews"] = without_items((folder / f"{dataset}.reviews").read_text(encoding="utf-8"),
                                                           set(split.cold_items))
        logging.info("seed %d: %d items held out of training, %d interactions dropped; the test target of %d of %d "
                     "users", seed, len(split.cold_items), split.dropped, split.cold_test_targets, split.test_targets)
    regions = folder / f"{dataset}.regions.tsv"
    if region_items and regions.is_file():
        replaced[regions.name] = sample_rows(regions.read_text(encoding="utf-8"), region_items)
    return linked_world(data_root, dataset, out, replaced) if replaced else data_root


def prepare_aligner(folder: Path) -> Path:
    """The alignment head in ``folder``, trained (minutes; resumable) when missing."""
    if not (folder / train_aligner.ALIGNER).is_file():
        train_aligner.main(ALIGNER_FLAGS + ["--out", str(folder)])
    return folder / train_aligner.ALIGNER


def round_report(run: FVERun, state: FVEState, features: np.ndarray) -> dict:
    """The kept model after a round: validation score, test NDCG@10 with all inputs and with the image masked,
    and the round's summary (attention, changed prompts, extraction cost)."""
    model = run.load_model(features, run.output / state.kept_model_file)
    trainer = run.trainer(model, run.output)
    test = visual_utilisation(trainer, run.test_data, modalities=("image",), metrics=("ndcg@10",))
    buckets = evaluate_buckets(model, run.train_data, run.test_data, topk=(10, 20))
    summary = state.rounds[-1]
    return {
        "round": state.round, "kept_round": state.kept_round, "kept": bool(summary["kept"]),
        "valid_ndcg@10": state.best_valid_score, "round_valid_ndcg@10": summary["valid_score"],
        "test_ndcg@10": test["full"]["ndcg@10"],
        "image_drop": test["drop"]["image"]["ndcg@10"], "changed_prompts": summary["changed_prompts"],
        "attention": summary.get("attention"), "extract_seconds": summary.get("extract_seconds"),
        "encoded": summary.get("encoded"), "keep_test": summary.get("keep_test"), "buckets": buckets,
    }


def run_arms(seed: int, data_root: Path, encoder: AlignedPromptEncoder, out: Path, rounds: int,
             config: dict, dataset: str = WORLD, critic: Callable[[], Critic] = OfflineCritic,
             cold_share: float = 0.0, region_items: int | None = None, model: str = MODEL,
             arms: Sequence[str] = ARMS) -> dict[str, list[dict]]:
    """The ``arms`` (default all four) for one seed: per arm, one :func:`round_report` per round (the control's
    and the every-item arm's round 0 is FVE's); an arm left out has no rows. All arms read the same
    :func:`seed_world` (with ``cold_share``: the same cold split)."""
    check_arms(arms)
    config = {**QUICK, **config, "seed": seed, "checkpoint_dir": str(out / "saved")}
    if cold_share:  # the items held out of every interaction stay in the catalogue (as cold_item_share leaves them)
        config.setdefault("load_col", {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]})
    data_root = seed_world(data_root, dataset, out / "data", seed, {**config, "data_path": str(data_root)},
                           cold_share, region_items, model)
    config["data_path"] = str(data_root)
    reports: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    fve_dir, control_dir, every_dir = out / f"fve-{seed}", out / f"control-{seed}", out / f"every-{seed}"

    def fve_round(run: FVERun, state: FVEState, features: np.ndarray) -> None:
        reports["FVE"].append(round_report(run, state, features))
        if state.round == 0:  # the control and every-item arms start from this very round 0
            for arm, folder in (("control", control_dir), ("every item", every_dir)):
                if arm not in arms:
                    continue
                shutil.copytree(fve_dir, folder, dirs_exist_ok=True)
                reports[arm].append(reports["FVE"][0])

    run_fve(model, dataset, rounds=rounds, config_dict=config, encoder=encoder, critic=critic(),
            output_dir=fve_dir, on_round=fve_round)
    if "control" in arms:
        every_review = [r for texts in read_reviews(data_root / dataset / f"{dataset}.reviews").values() for r in texts]
        control = RandomReviewWordsCritic(critic(), seed=seed, fallback_words=review_vocabulary(every_review))
        run_fve(model, dataset, rounds=rounds, config_dict=config, encoder=encoder, critic=control,
                output_dir=control_dir,
                on_round=lambda run, state, features: reports["control"].append(round_report(run, state, features)))
    if "every item" in arms:
        run_fve(model, dataset, rounds=1, config_dict={**config, "fve_select_fraction": 1.0}, encoder=encoder,
                critic=critic(), output_dir=every_dir,
                on_round=lambda run, state, features: reports["every item"].append(round_report(run, state, features)))
    if "no prompt" in arms:
        uniform = UniformPoolingEncoder(encoder.backbone, encoder.text_encoder, encoder.head)
        run_fve(model, dataset, rounds=0, config_dict=config, encoder=uniform, output_dir=out / f"uniform-{seed}",
                on_round=lambda run, state, features: reports["no prompt"].append(round_report(run, state, features)))
    return reports


def check_arms(arms: Sequence[str]) -> None:
    """Known arm names, FVE among them (the others start from its round 0 or are compared with it)."""
    unknown = set(arms) - set(ARMS)
    if unknown or "FVE" not in arms:
        raise SystemExit(f"--arms: choose among {list(ARMS)}, FVE included (got {list(arms)})")


# ----------------------------------------------------------------------------- the table
def _stat(values: list[float | None], digits: int = 4) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(results: dict[int, dict[str, list[dict]]]) -> str:
    """Markdown: one row per (arm, round), mean ± std over seeds."""
    lines = [
        "| arm | round | valid NDCG@10 | test NDCG@10 | image-masked drop (test NDCG@10) | rounds kept | "
        "round's own valid NDCG@10 | changed prompts | region attention, all items (kept prompts) | "
        "region attention, changed items: before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seeds = sorted(results)
    for arm in ARMS:
        for index in range(max(len(results[s].get(arm, [])) for s in seeds)):
            rows = [results[s][arm][index] for s in seeds if index < len(results[s][arm])]
            attention = [row["attention"] or {} for row in rows]
            kept = sum(row["kept"] for row in rows) if index else "-"
            changed = (f"{_stat([a.get('changed_before') for a in attention], 3)} -> "
                       f"{_stat([a.get('changed') for a in attention], 3)}") if index else "-"
            lines.append(
                f"| {arm} | {rows[0]['round']} | {_stat([r['valid_ndcg@10'] for r in rows])} | "
                f"{_stat([r['test_ndcg@10'] for r in rows])} | {_stat([r['image_drop'] for r in rows])} | "
                f"{kept} | {_stat([r['round_valid_ndcg@10'] for r in rows]) if index else '-'} | "
                f"{_stat([float(r['changed_prompts']) for r in rows], 0) if index else '-'} | "
                f"{_stat([a.get('kept') for a in attention], 3)} | {changed} |"
            )
    return "\n".join(lines)


def bucket_table(results: dict[int, dict[str, list[dict]]], metric: str = "ndcg@10") -> str:
    """Markdown: test ``metric`` per kind of target (columns) for each (arm, round), mean ± std over seeds, and
    the targets per bucket (the arms of a seed share them: one split); rounds without buckets are left out."""
    seeds = sorted(results)
    lines = [f"| arm | round | {' | '.join(BUCKETS)} |", "|---|---|" + "---|" * len(BUCKETS)]
    counts: dict[str, list[int]] = {bucket: [] for bucket in BUCKETS}
    for arm in ARMS:
        for index in range(max(len(results[s].get(arm, [])) for s in seeds)):
            rows = [results[s][arm][index] for s in seeds if index < len(results[s][arm])]
            rows = [row["buckets"] for row in rows if row.get("buckets")]
            if not rows:
                continue
            if not counts[BUCKETS[0]]:  # the first row's targets: the arms of a seed share one split
                for bucket in BUCKETS:
                    counts[bucket] = [row[bucket]["n"] for row in rows]
            cells = [_stat([row[bucket][metric] for row in rows]) for bucket in BUCKETS]
            lines.append(f"| {arm} | {results[seeds[0]][arm][index]['round']} | {' | '.join(cells)} |")
    if len(lines) == 2:
        return ""
    lines.append(f"| test targets | - | {' | '.join(_stat([float(n) for n in counts[b]], 0) for b in BUCKETS)} |")
    return "\n".join(lines)


def versus_buckets(results: dict[int, dict[str, list[dict]]], metric: str = "ndcg@10") -> dict[str, dict]:
    """Per other arm and bucket: FVE's last-round test ``metric`` minus the arm's last round, per seed, and FVE's
    seed std in that bucket (None where a bucket has no target)."""
    seeds = [s for s in sorted(results) if results[s]["FVE"][-1].get("buckets")]
    report: dict[str, dict] = {}
    for arm in ARMS:
        if arm == "FVE" or not seeds or not all(results[s].get(arm) for s in seeds):
            continue
        report[arm] = {}
        for bucket in BUCKETS:
            fve = [results[s]["FVE"][-1]["buckets"][bucket][metric] for s in seeds]
            other = [results[s][arm][-1]["buckets"][bucket][metric] for s in seeds]
            diffs = [None if f is None or o is None else f - o for f, o in zip(fve, other)]
            known = [f for f in fve if f is not None]
            spread = float(np.std(known, ddof=1)) if len(known) > 1 else None
            report[arm][bucket] = {"per_seed": diffs, "fve_seed_std": spread}
    return report


def extraction(results: dict[int, dict[str, list[dict]]]) -> dict:
    """Round 0 (every item encoded, cold cache) against round 1 (only changed prompts) of the FVE arm."""
    first = [results[s]["FVE"][0] for s in results]
    second = [results[s]["FVE"][1] for s in results if len(results[s]["FVE"]) > 1]
    summary = {
        "round0_seconds": float(np.mean([r["extract_seconds"] for r in first])),
        "round0_images": float(np.mean([r["encoded"] for r in first])),
        "images_per_second": float(np.mean([r["encoded"] / r["extract_seconds"] for r in first])),
    }
    if second and all(r["extract_seconds"] is not None for r in second):
        summary.update(
            round1_seconds=float(np.mean([r["extract_seconds"] for r in second])),
            round1_images=float(np.mean([r["encoded"] for r in second])),
            ratio=float(np.mean([b["extract_seconds"] / a["extract_seconds"] for a, b in zip(first, second)])),
        )
    return summary


def versus(results: dict[int, dict[str, list[dict]]]) -> dict[str, dict]:
    """FVE's last-round test NDCG@10 minus each control's, per seed, against the seed spread of FVE."""
    seeds = sorted(results)
    fve = [results[s]["FVE"][-1]["test_ndcg@10"] for s in seeds]
    spread = float(np.std(fve, ddof=1)) if len(fve) > 1 else math.nan
    return {arm: {"per_seed": [f - results[s][arm][-1]["test_ndcg@10"] for f, s in zip(fve, seeds)],
                  "fve_seed_std": spread} for arm in ARMS if arm != "FVE" and all(results[s].get(arm) for s in seeds)}


# ----------------------------------------------------------------------------- what the features carry
def cue_agreement(features: np.ndarray, hue: np.ndarray, shape: np.ndarray, k: int = 10,
                  hue_window: float = 20.0) -> dict[str, float]:
    """Share of each item's ``k`` nearest items (cosine) with its shape, with a hue within ``hue_window``
    degrees, and with both: how much of the hidden cue users' taste follows a feature carries."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    same_shape = shape[nearest] == shape[:, None]
    near_hue = np.abs((hue[nearest] - hue[:, None] + 180.0) % 360.0 - 180.0) < hue_window
    both = same_shape & near_hue
    return {"shape": float(same_shape.mean()), "hue": float(near_hue.mean()), "both": float(both.mean())}


def probe(world: Path, encoder: AlignedPromptEncoder, batch_size: int = 64) -> str:
    """Markdown: region attention and :func:`cue_agreement` of the aligned features of every item under each
    kind of prompt (no training; the patches are embedded once)."""
    from reveal_recbole.fve.aligned import weighted_patch_mean
    from reveal_recbole.fve.attention import read_item_regions, region_attention_mass
    from reveal_recbole.fve.loop import initial_prompts
    from reveal_recbole.fve.prompt import review_phrase
    from reveal_recbole.fve.sources import read_item_texts
    from reveal_recbole.image_io import decode_image

    truth = {row[0]: row[1:] for row in (line.split("\t") for line in
                                        (world / f"{world.name}.truth.tsv").read_text().splitlines()[1:])}
    tokens = sorted(truth)
    regions = read_item_regions(world / f"{world.name}.regions.tsv")
    images = [encoder.prepare(decode_image((world / "images" / f"{t}.png").read_bytes())) for t in tokens]
    embedded = torch.cat([encoder.patch_embeddings(images[start:start + batch_size])
                          for start in range(0, len(images), batch_size)])
    texts = read_item_texts(world, world.name)
    template, _ = initial_prompts(tokens, texts)
    metadata, _ = initial_prompts(tokens, texts, METADATA_ONLY)
    phrase = {t: review_phrase(texts[t].reviews) if t in texts else "" for t in tokens}
    hue = np.array([float(truth[t][0]) for t in tokens])
    shape = np.array([truth[t][1] for t in tokens])
    uniform = UniformPoolingEncoder(encoder.backbone, encoder.text_encoder, encoder.head)
    rows = ["| prompts | region attention | kNN same shape | kNN hue within 20 deg | kNN both |",
            "|---|---|---|---|---|"]
    for name, prompts, pooling in (
        ("none (uniform pooling)", template, uniform), ("metadata-only template", metadata, encoder),
        ("the paper's template (review keywords)", template, encoder),
        ("the offline critic's review phrase, every item", {t: phrase[t] or template[t] for t in tokens}, encoder),
        ("the true colour name and shape (oracle)",
         {t: f"{make_synthetic.colour_name(float(truth[t][0]))} {truth[t][1]}" for t in tokens}, encoder),
    ):
        weights = pooling.pooling_weights(embedded, [prompts[t] for t in tokens])
        mass = region_attention_mass(weights.numpy(), [regions[t] for t in tokens])
        agreement = cue_agreement(weighted_patch_mean(weights, embedded).numpy(), hue, shape)
        rows.append(f"| {name} | {mass.mean():.3f} | {agreement['shape']:.3f} | {agreement['hue']:.3f} | "
                    f"{agreement['both']:.3f} |")
    hue_chance = np.mean(np.abs((hue[:, None] - hue[None] + 180) % 360 - 180) < 20)
    shape_chance = np.mean(shape[:, None] == shape[None])
    rows.append(f"| chance (any other item) | - | {shape_chance:.3f} | {hue_chance:.3f} | - |")
    return "\n".join(rows)


def combined(paths: list[Path]) -> tuple[dict[int, dict[str, list[dict]]], dict]:
    """The results of several runs' JSON reports (other seeds of one setting) as one, and the first report."""
    reports = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    first = reports[0]
    for report in reports[1:]:
        for key in ("model", "rounds", "world", "config", "prompt_template", "cold_item_share", "arms"):
            if report.get(key) != first.get(key):
                raise SystemExit(f"--combine: the runs differ in {key}: {first.get(key)!r} vs {report.get(key)!r}")
    results = {int(seed): arms for report in reports for seed, arms in report["results"].items()}
    if len(results) < sum(len(report["results"]) for report in reports):
        raise SystemExit("--combine: a seed occurs in more than one run")
    first["seconds"] = sum(report["seconds"] for report in reports)
    return results, first


def claim_work_folder(root: Path, stamp: str) -> tuple[Path, str]:
    """``root/<stamp>``, made by this run alone (``-2``, ``-3``, ... when a run started in the same second
    has it): the stamp also names the report, which a parallel run would otherwise overwrite."""
    root.mkdir(parents=True, exist_ok=True)
    for suffix in ("", *(f"-{n}" for n in range(2, 1000))):
        try:
            (root / f"{stamp}{suffix}").mkdir()
        except FileExistsError:
            continue
        return root / f"{stamp}{suffix}", f"{stamp}{suffix}"
    raise SystemExit(f"{root}: no free folder for stamp {stamp}")


def write_report(report: dict, results: dict[int, dict[str, list[dict]]], results_dir: Path, stamp: str) -> str:
    """The markdown of ``report`` (tables, extraction, FVE minus each control), written beside its JSON."""
    report.update(seeds=sorted(results), results=results, extraction=extraction(results), fve_minus=versus(results),
                  fve_minus_buckets=versus_buckets(results))
    cost = report["extraction"]
    text = ""
    if report.get("dataset", WORLD) != WORLD or report.get("cold_item_share") or report.get("model", MODEL) != MODEL:
        seeds = ", ".join(map(str, sorted(results)))
        text = (f"Model: {report.get('model', MODEL)}; world: {report['dataset']}; "
                f"cold_item_share {report.get('cold_item_share') or 0} "
                f"(cold_items: {report.get('cold_items') or 'train'}); seeds {seeds}\n\n")
    text += (f"Round 0's prompt template: {report['prompt_template']}; further config: {report['config'] or 'none'}\n\n"
             f"{table(results)}\n\n"
             "Extraction (aligned encoder, FVE arm, mean over seeds): round 0 encodes "
             f"{cost['round0_images']:.0f} images in {cost['round0_seconds']:.1f} s ({cost['images_per_second']:.1f} "
             "images/s)")
    if "ratio" in cost:
        text += (f"; round 1 re-encodes {cost['round1_images']:.0f} changed prompts in {cost['round1_seconds']:.1f} s "
                 f"(round 1 / round 0 = {cost['ratio']:.2f})")
    for arm, diff in report["fve_minus"].items():
        spread = diff["fve_seed_std"]
        text += (f"\n\nFVE (round {report['rounds']}) minus {arm}, test NDCG@10 per seed: "
                 f"{', '.join(f'{d:+.4f}' for d in diff['per_seed'])} (FVE's seed std {spread:.4f})")
    for metric in BUCKET_METRICS:
        buckets = bucket_table(results, metric)
        if buckets:
            text += f"\n\nTest {metric.upper().replace('RECALL', 'Recall')} per kind of target:\n\n{buckets}"
    for arm, per_bucket in report["fve_minus_buckets"].items():
        cells = []
        for bucket, diff in per_bucket.items():
            seeds = ", ".join("-" if d is None else f"{d:+.4f}" for d in diff["per_seed"])
            spread = "-" if diff["fve_seed_std"] is None else f"{diff['fve_seed_std']:.4f}"
            cells.append(f"{bucket} {seeds} (std {spread})")
        text += f"\n\nFVE (round {report['rounds']}) minus {arm}, test NDCG@10 per seed: {'; '.join(cells)}"
    text += f"\n\nTotal: {report['seconds'] / 60:.1f} min"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"fve-world-{stamp}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (results_dir / f"fve-world-{stamp}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020, 2021, 2022])
    parser.add_argument("--model", default=MODEL,
                        help="the recommender every arm trains: a REVEAL model or a multimodal peer that reads the "
                             "image features (M3SRec, SASRecF, ...), for the 'peer + FVE' rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", choices=WORLDS, default=WORLD,
                        help="the dataset: synthetic_clutter (500 items, about 20 interactions each) or "
                             "synthetic_clutter_sparse (3,000 items, about 3 each; same users and interactions)")
    parser.add_argument("--cold-share", type=float, default=0.0,
                        help="hold this share of the items out of training in every arm (cold_item_share's hold-out)")
    parser.add_argument("--cold-items", default="features", choices=("features", "neighbour", "train", "auto"),
                        help="with --cold-share: cold_items of every arm (features: a cold item is its features alone)")
    parser.add_argument("--region-items", type=int, default=None,
                        help="measure region attention on a sample of this many items (default: every item)")
    parser.add_argument("--data-root", type=Path, default=Path("dataset"))
    parser.add_argument("--aligner", type=Path, default=Path("saved/aligner-clutter"))
    parser.add_argument("--work", type=Path, default=Path("saved/bench-fve-world"), help="FVE output folders")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further config keys for every run (values read as yaml), e.g. feature_trainable=False")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), metavar="ARM",
                        help=f"the arms to run, FVE included (default all: {', '.join(ARMS)}); the 'peer' rows need "
                             "only FVE and 'no prompt'")
    parser.add_argument("--probe", action="store_true",
                        help="only print what the features carry under each kind of prompt (no training; a minute)")
    parser.add_argument("--prompt-template", default=None,
                        help="round 0's prompt template (fve_prompt_template); default: the paper's, with review "
                             f"keywords. E.g. {METADATA_ONLY!r}: no review words before the critic")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="JSON",
                        help="no training: one report from these runs' JSON reports (other seeds, same settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.combine:
        results, report = combined(args.combine)
        text = write_report(report, results, args.results, stamp)
        print(text)
        return report
    torch.set_num_threads(1)
    begin = time.perf_counter()
    prepare_world(args.data_root, args.world)
    encoder = AlignedPromptEncoder.from_aligner(prepare_aligner(args.aligner))
    if args.probe:
        text = probe(args.data_root / args.world, encoder)
        print(text)
        return {"probe": text}
    work, stamp = claim_work_folder(args.work, stamp)
    cold = {"cold_items": args.cold_items} if args.cold_share else {}
    results = {}
    for seed in args.seeds:
        overrides = {**cold, **{key: yaml.safe_load(value)
                                for key, _, value in (item.partition("=") for item in args.config)}}
        if args.prompt_template:
            overrides["fve_prompt_template"] = args.prompt_template
        results[seed] = run_arms(seed, args.data_root, encoder, work / f"seed-{seed}", args.rounds, overrides,
                                 dataset=args.world, cold_share=args.cold_share, region_items=args.region_items,
                                 model=args.model, arms=args.arms)
        logging.info("seed %d done after %.0f s", seed, time.perf_counter() - begin)
    report = {"model": args.model, "seeds": args.seeds, "rounds": args.rounds, "budget": QUICK,
              "world": world_command(args.world),
              "dataset": args.world, "cold_item_share": args.cold_share or None,
              "cold_items": args.cold_items if args.cold_share else None, "region_items": args.region_items,
              "prompt_template": args.prompt_template or "the paper's (fve.prompt.DEFAULT_TEMPLATE)",
              "config": args.config, "arms": args.arms, "aligner": ALIGNER_FLAGS,
              "seconds": time.perf_counter() - begin}
    text = write_report(report, results, args.results, stamp)
    print(text)
    return report


if __name__ == "__main__":
    main()
