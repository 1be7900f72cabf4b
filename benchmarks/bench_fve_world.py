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
round, and the extraction time of round 0 (every item) against round 1 (only the changed prompts).
Writes ``<--results>/fve-world-<time>.json`` and ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py                 # 3 seeds x 3 rounds
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --seeds 2020 --rounds 1   # quicker
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --config feature_trainable=False avl=False  # the defaults
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --probe   # what the features carry per prompt, no training
    OMP_NUM_THREADS=1 python benchmarks/bench_fve_world.py --prompt-template "An item image of a {category}. \
        Item name: {title}. Focus on the overall appearance of the item."   # round 0 without review keywords
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
from typing import Callable

import numpy as np
import torch
import yaml

from dataset_prep import make_synthetic, train_aligner
from reveal_recbole.diagnostics import visual_utilisation
from reveal_recbole.fve.aligned import AlignedPromptEncoder, UniformPoolingEncoder
from reveal_recbole.fve.critic import Critic, OfflineCritic, RandomReviewWordsCritic, review_vocabulary
from reveal_recbole.fve.loop import FVERun, FVEState, run_fve
from reveal_recbole.fve.sources import read_reviews
from reveal_recbole.resources import properties_dir

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


def world_command() -> list[str]:
    """make_synthetic's arguments from the world's dataset yaml (its one prepare command)."""
    with open(properties_dir() / "dataset" / f"{WORLD}.yaml", encoding="utf-8") as handle:
        command = shlex.split(yaml.safe_load(handle)["prepare_commands"][0])
    return command[command.index("dataset_prep/make_synthetic.py") + 1:]


def prepare_world(data_root: Path) -> Path:
    """The world's folder under ``data_root``, generated (deterministic, seconds) when missing."""
    folder = data_root / WORLD
    if not (folder / f"{WORLD}.inter").is_file():
        make_synthetic.main(world_command() + ["--out", str(folder)])
    return folder


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
    summary = state.rounds[-1]
    return {
        "round": state.round, "kept_round": state.kept_round, "kept": bool(summary["kept"]),
        "valid_ndcg@10": state.best_valid_score, "round_valid_ndcg@10": summary["valid_score"],
        "test_ndcg@10": test["full"]["ndcg@10"],
        "image_drop": test["drop"]["image"]["ndcg@10"], "changed_prompts": summary["changed_prompts"],
        "attention": summary.get("attention"), "extract_seconds": summary.get("extract_seconds"),
        "encoded": summary.get("encoded"), "keep_test": summary.get("keep_test"),
    }


def run_arms(seed: int, data_root: Path, encoder: AlignedPromptEncoder, out: Path, rounds: int,
             config: dict, dataset: str = WORLD, critic: Callable[[], Critic] = OfflineCritic) -> dict[str, list[dict]]:
    """The four arms for one seed: per arm, one :func:`round_report` per round (the control's and the every-item
    arm's round 0 is FVE's)."""
    config = {**QUICK, **config, "seed": seed, "data_path": str(data_root),
              "checkpoint_dir": str(out / "saved")}
    reports: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    fve_dir, control_dir, every_dir = out / f"fve-{seed}", out / f"control-{seed}", out / f"every-{seed}"

    def fve_round(run: FVERun, state: FVEState, features: np.ndarray) -> None:
        reports["FVE"].append(round_report(run, state, features))
        if state.round == 0:  # the control and every-item arms start from this very round 0
            for arm, folder in (("control", control_dir), ("every item", every_dir)):
                shutil.copytree(fve_dir, folder, dirs_exist_ok=True)
                reports[arm].append(reports["FVE"][0])

    run_fve(MODEL, dataset, rounds=rounds, config_dict=config, encoder=encoder, critic=critic(),
            output_dir=fve_dir, on_round=fve_round)
    every_review = [r for texts in read_reviews(data_root / dataset / f"{dataset}.reviews").values() for r in texts]
    control = RandomReviewWordsCritic(critic(), seed=seed, fallback_words=review_vocabulary(every_review))
    run_fve(MODEL, dataset, rounds=rounds, config_dict=config, encoder=encoder, critic=control, output_dir=control_dir,
            on_round=lambda run, state, features: reports["control"].append(round_report(run, state, features)))
    run_fve(MODEL, dataset, rounds=1, config_dict={**config, "fve_select_fraction": 1.0}, encoder=encoder,
            critic=critic(), output_dir=every_dir,
            on_round=lambda run, state, features: reports["every item"].append(round_report(run, state, features)))
    uniform = UniformPoolingEncoder(encoder.backbone, encoder.text_encoder, encoder.head)
    run_fve(MODEL, dataset, rounds=0, config_dict=config, encoder=uniform, output_dir=out / f"uniform-{seed}",
            on_round=lambda run, state, features: reports["no prompt"].append(round_report(run, state, features)))
    return reports


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
        for index in range(max(len(results[s][arm]) for s in seeds)):
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
                  "fve_seed_std": spread} for arm in ARMS if arm != "FVE"}


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
                                        (world / f"{WORLD}.truth.tsv").read_text().splitlines()[1:])}
    tokens = sorted(truth)
    regions = read_item_regions(world / f"{WORLD}.regions.tsv")
    images = [encoder.prepare(decode_image((world / "images" / f"{t}.png").read_bytes())) for t in tokens]
    embedded = torch.cat([encoder.patch_embeddings(images[start:start + batch_size])
                          for start in range(0, len(images), batch_size)])
    texts = read_item_texts(world, WORLD)
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020, 2021, 2022])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-root", type=Path, default=Path("dataset"))
    parser.add_argument("--aligner", type=Path, default=Path("saved/aligner-clutter"))
    parser.add_argument("--work", type=Path, default=Path("saved/bench-fve-world"), help="FVE output folders")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further config keys for every run (values read as yaml), e.g. feature_trainable=False")
    parser.add_argument("--probe", action="store_true",
                        help="only print what the features carry under each kind of prompt (no training; a minute)")
    parser.add_argument("--prompt-template", default=None,
                        help="round 0's prompt template (fve_prompt_template); default: the paper's, with review "
                             f"keywords. E.g. {METADATA_ONLY!r}: no review words before the critic")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    begin = time.perf_counter()
    prepare_world(args.data_root)
    encoder = AlignedPromptEncoder.from_aligner(prepare_aligner(args.aligner))
    if args.probe:
        text = probe(args.data_root / WORLD, encoder)
        print(text)
        return {"probe": text}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.work / stamp
    results = {}
    for seed in args.seeds:
        overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.config)}
        if args.prompt_template:
            overrides["fve_prompt_template"] = args.prompt_template
        results[seed] = run_arms(seed, args.data_root, encoder, work / f"seed-{seed}", args.rounds, overrides)
        logging.info("seed %d done after %.0f s", seed, time.perf_counter() - begin)
    report = {"seeds": args.seeds, "rounds": args.rounds, "budget": QUICK, "world": world_command(),
              "prompt_template": args.prompt_template or "the paper's (fve.prompt.DEFAULT_TEMPLATE)",
              "config": args.config,
              "aligner": ALIGNER_FLAGS, "results": results, "extraction": extraction(results),
              "fve_minus": versus(results), "seconds": time.perf_counter() - begin}
    cost = report["extraction"]
    text = (f"Round 0's prompt template: {report['prompt_template']}; further config: {args.config or 'none'}\n\n"
            f"{table(results)}\n\n"
            "Extraction (aligned encoder, FVE arm, mean over seeds): round 0 encodes "
            f"{cost['round0_images']:.0f} images in {cost['round0_seconds']:.1f} s ({cost['images_per_second']:.1f} "
            "images/s)")
    if "ratio" in cost:
        text += (f"; round 1 re-encodes {cost['round1_images']:.0f} changed prompts in {cost['round1_seconds']:.1f} s "
                 f"(round 1 / round 0 = {cost['ratio']:.2f})")
    for arm, diff in report["fve_minus"].items():
        text += (f"\n\nFVE (round {args.rounds}) minus {arm}, test NDCG@10 per seed: "
                 f"{', '.join(f'{d:+.4f}' for d in diff['per_seed'])} (FVE's seed std {diff['fve_seed_std']:.4f})")
    text += f"\n\nTotal: {report['seconds'] / 60:.1f} min"
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"fve-world-{stamp}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.results / f"fve-world-{stamp}.md").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
