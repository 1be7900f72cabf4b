"""Download each item's main image listed in ``<name>.images.tsv`` into ``<dataset dir>/images/``.

Input: ``<dir>/<name>.images.tsv`` as ``convert_amazon.py`` writes it (``item_id<TAB>image_urls``,
URLs separated by spaces, the main image first). ``http(s)://`` and ``file://`` URLs are fetched;
a plain path (as ``make_synthetic.py`` writes, relative to the dataset folder) is already local
and only checked.

Output: ``<dir>/images/<item>.<jpg|png|webp>`` (the layout FVE reads, config key ``image_dir``),
each written atomically after Pillow has decoded it, so a file that exists is a whole, valid
image; and ``<dir>/<name>.images_failed.tsv`` (``item_id<TAB>url<TAB>reason``) for the items that
could not be fetched. The run is resumable: items whose image file already exists are skipped.
For each item the URLs are tried in order (``--all-urls``; default: the main one only), each up
to ``--retries`` times with exponential back-off; ``--workers`` downloads run at once.

Usage::

    python dataset_prep/download_images.py --dir dataset/sports_raw --name sports_raw --workers 16
"""
from __future__ import annotations

import argparse
import io
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset_prep.common import progress  # noqa: E402
from reveal_recbole.utils import atomic_write_bytes, atomic_write_text  # noqa: E402

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".png"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
USER_AGENT = "reveal-recbole-dataset-prep/0.1 (research; image download)"


@dataclass
class Outcome:
    item: str
    status: str  # "downloaded", "present", "failed"
    detail: str = ""
    url: str = ""


def read_image_list(path: Path) -> list[tuple[str, list[str]]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header[:2] != ["item_id", "image_urls"]:
            raise ValueError(f"{path}: header {header} is not 'item_id<TAB>image_urls'")
        for line in handle:
            item, _, urls = line.rstrip("\n").partition("\t")
            if item and urls.strip():
                rows.append((item, urls.split()))
    return rows


def existing_image(folder: Path, item: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{item}{suffix}").is_file():
            return folder / f"{item}{suffix}"
    return None


def fetch(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http, https, file only)
        return response.read()


def decoded_format(data: bytes) -> str:
    """The image format Pillow finds after fully decoding ``data`` (raises on a broken image)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format or ""


def download_item(
    item: str, urls: list[str], base: Path, folder: Path, retries: int, timeout: float, backoff: float
) -> Outcome:
    if existing_image(folder, item) is not None:
        return Outcome(item, "present")
    errors = []
    for url in urls:
        if "://" not in url:  # a local path, relative to the dataset folder
            local = (base / url).resolve()
            if local.is_file() and local.suffix.lower() in IMAGE_SUFFIXES:
                return Outcome(item, "present", url=url)
            errors.append(f"{url}: no such local image")
            continue
        if not url.startswith(("http://", "https://", "file://")):
            errors.append(f"{url}: unsupported scheme")
            continue
        for attempt in range(retries + 1):
            try:
                data = fetch(url, timeout)
                kind = decoded_format(data)
                if kind == "GIF":  # keep FVE's formats: re-encode the first frame as PNG
                    with Image.open(io.BytesIO(data)) as image:
                        buffer = io.BytesIO()
                        image.convert("RGB").save(buffer, format="PNG")
                        data = buffer.getvalue()
                if kind not in EXTENSIONS:
                    raise UnidentifiedImageError(f"unsupported image format {kind!r}")
                atomic_write_bytes(folder / f"{item}{EXTENSIONS[kind]}", data)
                return Outcome(item, "downloaded", url=url)
            except urllib.error.HTTPError as error:
                errors.append(f"{url}: HTTP {error.code}")
                if error.code in (403, 404, 410):
                    break  # will not change on retry
            except (urllib.error.URLError, TimeoutError, OSError, UnidentifiedImageError, ValueError) as error:
                errors.append(f"{url}: {type(error).__name__}: {error}")
                if isinstance(error, (UnidentifiedImageError, ValueError)):
                    break
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
    return Outcome(item, "failed", "; ".join(errors)[-500:], urls[0] if urls else "")


def download(
    folder: Path,
    name: str,
    images_dir: Path | None = None,
    workers: int = 8,
    retries: int = 2,
    timeout: float = 20.0,
    backoff: float = 1.0,
    all_urls: bool = False,
    limit: int | None = None,
) -> dict:
    start = time.perf_counter()
    rows = read_image_list(folder / f"{name}.images.tsv")[:limit]
    target = images_dir or folder / "images"
    target.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [
            pool.submit(download_item, item, urls if all_urls else urls[:1], folder, target, retries, timeout, backoff)
            for item, urls in rows
        ]
        for future in progress(as_completed(futures), "download images", total=len(futures), unit="images"):
            outcomes.append(future.result())
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: o.item)
    failed_path = folder / f"{name}.images_failed.tsv"
    if failed:
        lines = ["item_id\turl\treason", *(f"{o.item}\t{o.url}\t{' '.join(o.detail.split())}" for o in failed)]
        atomic_write_text(failed_path, "\n".join(lines) + "\n")
    elif failed_path.exists():
        failed_path.unlink()
    counts = {status: sum(o.status == status for o in outcomes) for status in ("downloaded", "present", "failed")}
    result = {"items": len(rows), **counts, "seconds": time.perf_counter() - start}
    print(
        f"{target}: {counts['downloaded']} downloaded, {counts['present']} already there, {counts['failed']} failed"
        + (f" (see {failed_path})" if failed else "") + f"; {result['seconds']:.1f} s"
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="dataset folder holding <name>.images.tsv")
    parser.add_argument("--name", required=True, help="dataset name")
    parser.add_argument("--images-dir", type=Path, default=None, help="where to put the images (default: <dir>/images)")
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    parser.add_argument("--retries", type=int, default=2, help="retries per URL after a network error (default 2)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per request (default 20)")
    parser.add_argument("--all-urls", action="store_true", help="fall back to an item's other URLs when the main one fails")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items (a trial run)")
    args = parser.parse_args(argv)
    try:
        return download(args.dir, args.name, args.images_dir, args.workers, args.retries, args.timeout,
                        all_urls=args.all_urls, limit=args.limit)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
