"""Prepare a dataset with a raw source on first use (``download: auto``): fetch, convert, images, features.

``create_dataset`` calls :func:`prepare_missing` before its file checks. When the configured dataset
has a raw source (``reveal_recbole.data.sources``) and files the run needs are missing, the stages run
in order, each through the existing ``dataset_prep`` code, in ``<data_path>/``:

1. **fetch**: the raw reviews and metadata into ``raw/`` (``raw_urls``), streamed to ``<file>.part``
   and resumed with an HTTP ``Range`` request after an interruption; the free disk space is checked
   against ``Content-Length`` first; a gzip file is read through before it is renamed to its name;
2. **convert**: ``dataset_prep/convert_amazon.py``'s ``convert`` (5-core; the counts are checked
   against ``published_counts`` when the config has them): ``<name>.inter/.item/.reviews/.images.tsv``;
3. **images**: ``dataset_prep/download_images.py``'s ``download`` into ``images/`` (itself resumable);
4. **features**: ``dataset_prep/extract_features.py``'s ``extract``, with the configured image encoder
   (``fve_encoder``, ``fve_encoder_name``) where its weights are local or the hub is reachable, the
   offline EfficientNet-Lite0 otherwise (logged), and the offline MiniLM text encoder.

A stage is done when its marker ``.prepare/<stage>.json`` exists (written atomically once all its
outputs are complete, holding its summary) and its outputs are there: a killed run restarts at the
first stage not done, and a rerun of a finished preparation fetches nothing. A stage that runs
removes the later stages' markers (they were made from what it replaces). ID-only models need
stages 1-2 only. Offline, the first request fails after ``CONNECT_TIMEOUT`` seconds and the run stops
with the commands that do the same by hand (``download: never`` prints them at once).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from reveal_recbole.atomic import atomic_write_text
from reveal_recbole.data.dataset import configured_modalities, feature_dir, missing_files, not_prepared_error
from reveal_recbole.data.sources import COUNTS, RawSource, download_mode, raw_source
from reveal_recbole.errors import DatasetNotPreparedError, PreparationError

logger = logging.getLogger(__name__)

STAGES = ("fetch", "convert", "images", "features")
MARKER_DIR = ".prepare"
CONNECT_TIMEOUT = 5.0  # seconds to reach a host: offline, the one attempt fails this fast
READ_TIMEOUT = 60.0  # seconds a raw download may go without data
CHUNK = 1 << 20
DISK_MARGIN = 256 * 2**20  # bytes left free beyond a download
IMAGE_BYTES = 100_000  # what one item image is assumed to take on disk, for the space check (Amazon's: 30-60 KB)
IMAGE_WORKERS, IMAGE_TIMEOUT, IMAGE_RETRIES, IMAGE_BACKOFF = 16, 20.0, 2, 1.0
OFFLINE_IMAGE_ENCODERS = ("efficientnet", "efficientnet-onnx")


class Unreachable(Exception):
    """A host that did not answer within ``CONNECT_TIMEOUT``: no network, or the source is down."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"could not reach {url} ({reason})")
        self.url = url


# ----------------------------------------------------------------------------- the hook
def prepare_missing(config, multimodal: bool) -> None:
    """Prepare the configured dataset when files the run needs are missing, it has a raw source and
    ``download`` is ``auto``; otherwise leave it to ``require_dataset_files``, which names what to run."""
    missing = missing_files(config, multimodal)
    source = raw_source(config)
    if not missing or source is None or download_mode(config) == "never":
        return
    modalities = [m for m in configured_modalities(config) if m in ("image", "text")] if multimodal else []
    if not config["single_spec"]:
        raise not_prepared_error(config, multimodal, missing,
                                 "a multi-process run does not prepare datasets: run one process first")
    try:
        prepare(source, modalities, image_encoder_setting(config), str(config["device"]), feature_dir(config))
    except Unreachable as error:
        raise not_prepared_error(config, multimodal, missing_files(config, multimodal),
                                 f"download: auto {error}") from None


def image_encoder_setting(config) -> tuple[str | None, str | None]:
    """(kind, model) of the configured image encoder: ``fve_encoder`` with ``fve_encoder_name`` (clip, vlm)
    or ``fve_aligner_path`` (aligned); (None, None) for the offline default."""
    kind = config["fve_encoder"]  # None for models without REVEAL's keys
    return kind, config["fve_aligner_path"] if kind == "aligned" else config["fve_encoder_name"]


# ----------------------------------------------------------------------------- the stages
def prepare(source: RawSource, modalities: list[str], image_encoder: tuple[str | None, str | None] = (None, None),
            device: str = "cpu", features_out: Path | None = None) -> dict[str, dict]:
    """Run the stages not done yet (fetch and convert; images and features when ``modalities`` ask for them);
    the feature files go to ``features_out`` (the config's ``feature_dir``; default the dataset folder)."""
    features_out = Path(features_out or source.folder)
    stages = list(STAGES[:2])
    if "image" in modalities and "meta" in source.urls:
        stages.append("images")
    if modalities:
        stages.append("features")
    check_not_foreign(source)
    summaries = {}
    for number, stage in enumerate(stages, start=1):
        label = f"prepare {source.name} [{number}/{len(stages)} {stage}]"
        marker = source.folder / MARKER_DIR / f"{stage}.json"
        started = marker.with_suffix(".started")
        outputs = stage_outputs(source, stage, modalities, features_out)
        if marker.is_file() and all(path.exists() for path in outputs):
            summaries[stage] = json.loads(marker.read_text(encoding="utf-8"))
            logger.info("%s: done before (%s)", label, marker)
            continue
        for later in STAGES[STAGES.index(stage) + 1:]:  # made from what this stage is about to replace
            (source.folder / MARKER_DIR / f"{later}.json").unlink(missing_ok=True)
        start = time.perf_counter()
        if stage == "fetch":
            summary = fetch(source)
        elif stage == "convert":
            atomic_write_text(started, "")  # the .inter about to appear is this preparation's
            summary = convert(source)
        elif stage == "images":
            summary = images(source)
        else:
            summary = features(source, modalities, *image_encoder, device, features_out)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_text(marker, json.dumps(summary, indent=1) + "\n")
        started.unlink(missing_ok=True)
        summaries[stage] = summary
        logger.info("%s: %s", label, describe(stage, summary))
    return summaries


def stage_outputs(source: RawSource, stage: str, modalities: list[str], features_out: Path) -> list[Path]:
    name, folder = source.name, source.folder
    if stage == "fetch":
        return [source.raw_path(kind) for kind in source.urls]
    if stage == "convert":
        return [folder / f"{name}.inter", folder / f"{name}.item"]
    if stage == "images":
        return [folder / "images"]
    return [features_out / f"{name}.{m}.{ext}" for m in modalities for ext in ("npy", "items")]


def check_not_foreign(source: RawSource) -> None:
    """Never overwrite a ``.inter`` this preparation did not write (e.g. one converted from the S3-Rec files)."""
    inter, marker = source.folder / f"{source.name}.inter", source.folder / MARKER_DIR / "convert.json"
    if inter.is_file() and not marker.is_file() and not marker.with_suffix(".started").is_file():
        raise DatasetNotPreparedError(
            f"{inter} exists but was not made from the raw files (no {marker}), and the run needs more: move it "
            "away to prepare the dataset from the raw files, or make the missing files by hand (README \"Datasets\")"
        )


def describe(stage: str, summary: dict) -> str:
    seconds = f"{summary['seconds']:.1f} s"
    if stage == "fetch":
        fetched, raw = size(summary["fetched_bytes"]), size(summary["raw_bytes"])
        return f"{fetched} fetched, {raw} in {summary['raw_dir']}, {seconds}"
    if stage == "convert":
        counts = ", ".join(f"{summary[key]:,} {key}" for key in COUNTS)
        check = summary.get("published_check", "")
        return f"{counts}{f' ({check})' if check else ''}, {seconds}"
    if stage == "images":
        return (f"{summary['downloaded']:,} downloaded, {summary['present']:,} already there, {summary['failed']:,} "
                f"failed of {summary['items']:,} items; {size(summary['image_bytes'])} in images/, {seconds}")
    return "; ".join(f"{m} {d['encoder']} {d['dim']}-d, {d['encoded']:,} encoded, {d['cached']:,} cached, "
                     f"{d['fallback']:,} fallback" for m, d in summary["modalities"].items()) + f"; {seconds}"


def size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} B"


# ----------------------------------------------------------------------------- 1. fetch
def fetch(source: RawSource) -> dict:
    fetched = 0
    for kind, url in source.urls.items():
        fetched += fetch_file(url, source.raw_path(kind), "fetch")
    return {"urls": dict(source.urls), "raw_dir": str(source.raw_dir), "fetched_bytes": fetched,
            "raw_bytes": sum(source.raw_path(kind).stat().st_size for kind in source.urls)}


def fetch_file(url: str, dest: Path, stage: str) -> int:
    """``url`` into ``dest`` through ``dest.part`` (resumed with a Range request); the bytes fetched now."""
    if dest.is_file():
        return 0
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        probe(url)  # offline: one fast failure, before anything is created
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if scheme == "file":
        local = Path(urllib.request.url2pathname(urlsplit(url).path))
        if not local.is_file():
            raise PreparationError(f"{stage}: {url}: no such file")
        check_disk(dest.parent, local.stat().st_size, url, stage)
        shutil.copyfile(local, part)
        fetched = local.stat().st_size
    elif scheme in ("http", "https"):
        fetched = download_to_part(url, part, stage)
    else:
        raise PreparationError(f"{stage}: {url}: unsupported URL scheme {scheme!r} (http, https or file)")
    verify_archive(part, url, stage)
    os.replace(part, dest)
    return fetched


def probe(url: str) -> None:
    """One TCP connection to ``url``'s host (or its proxy) within ``CONNECT_TIMEOUT``, else :class:`Unreachable`."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme.lower())
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else " ".join(str(error).split())
        raise Unreachable(url, f"{reason}; no network, or the source is down") from None


def download_to_part(url: str, part: Path, stage: str) -> int:
    from dataset_prep.download_images import OPENER, USER_AGENT  # http(s) only, redirects to http(s) only

    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    fetched = 0
    try:
        with OPENER.open(urllib.request.Request(url, headers=headers), timeout=READ_TIMEOUT) as response:
            resumed = have > 0 and response.status == 206 and response.headers.get(
                "Content-Range", "").startswith(f"bytes {have}-")
            if not resumed:
                have = 0
            length = response.headers.get("Content-Length")
            remaining = int(length) if length and length.strip().isdigit() else None
            if remaining is not None:
                check_disk(part.parent, remaining, url, stage)
            total = have + remaining if remaining is not None else None
            with open(part, "ab" if resumed else "wb") as handle, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=f"{stage} {part.name[:-5]}",
                mininterval=1.0, dynamic_ncols=True, leave=False,
            ) as bar:
                while chunk := response.read1(CHUNK):
                    handle.write(chunk)
                    fetched += len(chunk)
                    bar.update(len(chunk))
            if remaining is not None and fetched < remaining:
                raise PreparationError(
                    f"{stage}: {url}: the connection closed after {have + fetched:,} of {total:,} bytes; "
                    f"{part} keeps them: run again to resume"
                )
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and have:  # the part already holds the whole file
            return 0
        raise PreparationError(f"{stage}: {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        timed_out = isinstance(error.reason, TimeoutError)
        raise PreparationError(f"{stage}: {url}: " + (f"timed out (no data for {READ_TIMEOUT:g} s)" if timed_out
                               else f"connection failed: {error.reason}") + kept(part)) from None
    except (TimeoutError, OSError) as error:
        reason = f"timed out (no data for {READ_TIMEOUT:g} s)" if isinstance(error, TimeoutError) else \
            f"connection failed: {type(error).__name__}: {error}"
        raise PreparationError(f"{stage}: {url}: {reason}{kept(part)}") from None
    return fetched


def kept(part: Path) -> str:
    size = part.stat().st_size if part.is_file() else 0
    return f"; {part} keeps the {size:,} bytes fetched: run again to resume" if size else ""


def check_disk(folder: Path, size: int, url: str, stage: str) -> None:
    free = shutil.disk_usage(folder).free
    if size + DISK_MARGIN > free:
        raise PreparationError(
            f"{stage}: {url}: needs {size / 2**20:,.0f} MiB (+{DISK_MARGIN / 2**20:,.0f} MiB margin) in {folder}, "
            f"which has {free / 2**20:,.0f} MiB free"
        )


def verify_archive(part: Path, url: str, stage: str) -> None:
    """Read a ``.gz`` through to its end (CRC and length): a truncated or corrupt file is removed and named."""
    if not url.lower().split("?", 1)[0].endswith(".gz"):
        return
    try:
        with gzip.open(part, "rb") as handle:
            while handle.read(CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as error:
        part.unlink(missing_ok=True)
        raise PreparationError(
            f"{stage}: {url}: truncated or corrupt gzip ({type(error).__name__}: {error}); the partial file was "
            "removed: run again to fetch it anew"
        ) from None


# ----------------------------------------------------------------------------- 2. convert
def convert(source: RawSource) -> dict:
    from dataset_prep.convert_amazon import AmazonFormatError, convert

    meta = source.raw_path("meta") if "meta" in source.urls else None
    try:
        result = convert(source.raw_path("reviews"), source.folder, source.name, meta)
    except (AmazonFormatError, OSError, EOFError, zlib.error) as error:
        raise PreparationError(f"convert: {source.raw_path('reviews')} (from {source.urls['reviews']}): "
                               f"{error}") from None
    summary = {key: int(value) for key, value in result.items() if key in COUNTS}
    summary.update(items_with_image=result["items_with_image"], review_lines=result["review_lines"])
    if source.published:
        got = tuple(summary[key] for key in COUNTS)
        expected = tuple(int(source.published[key]) for key in COUNTS)
        if got == expected:
            summary["published_check"] = "the published 5-core counts"
        else:
            summary["published_check"] = "published: " + " / ".join(f"{n:,}" for n in expected)
            logger.warning(
                "prepare %s: the 5-core has %s users / items / interactions, the published counts are %s: the raw "
                "files differ from the ones the benchmark was made from", source.name,
                " / ".join(f"{n:,}" for n in got), " / ".join(f"{n:,}" for n in expected),
            )
    return summary


# ----------------------------------------------------------------------------- 3. images
def images(source: RawSource) -> dict:
    from dataset_prep.download_images import download, existing_image, read_image_list

    folder, name = source.folder, source.name
    rows = read_image_list(folder / f"{name}.images.tsv")
    target = folder / "images"
    target.mkdir(parents=True, exist_ok=True)
    pending = [urls[0] for item, urls in rows if existing_image(target, item) is None]
    if pending:
        check_disk(target, len(pending) * IMAGE_BYTES, f"{len(pending):,} images such as {pending[0]}", "images")
        if pending[0].startswith(("http://", "https://")):
            probe(pending[0])
    result = download(folder, name, target, workers=IMAGE_WORKERS, retries=IMAGE_RETRIES, timeout=IMAGE_TIMEOUT,
                      backoff=IMAGE_BACKOFF)
    if rows and result["downloaded"] + result["present"] == 0:
        raise PreparationError(
            f"images: none of the {len(rows):,} item images could be fetched (e.g. {rows[0][1][0]}); reasons in "
            f"{folder / f'{name}.images_failed.tsv'}"
        )
    summary = {key: int(result[key]) for key in ("items", "downloaded", "present", "failed")}
    summary["image_bytes"] = sum(path.stat().st_size for path in target.iterdir() if path.is_file())
    return summary


# ----------------------------------------------------------------------------- 4. features
def features(source: RawSource, modalities: list[str], kind: str | None, model: str | None, device: str,
             out: Path | None = None) -> dict:
    from dataset_prep.extract_features import ExtractError, default_image_encoder, extract

    image_kind, image_model = usable_image_encoder(kind, model) if "image" in modalities else (None, None)
    try:
        results = extract(source.folder, source.name, ",".join(modalities), out=out, image_encoder=image_kind,
                          image_model=image_model, device=device, show_progress=True)
    except ExtractError as error:
        raise PreparationError(f"features: {error}") from None
    encoders = {"image": image_kind or default_image_encoder(device), "text": "all-MiniLM-L6-v2 (offline)"}
    return {"modalities": {m: {"encoder": encoders[m] + (f" {image_model}" if m == "image" and image_model else ""),
                               "dim": r.dim, "encoded": r.encoded, "cached": r.cached, "fallback": r.fallback}
                           for m, r in results.items()}}


def usable_image_encoder(kind: str | None, model: str | None) -> tuple[str | None, str | None]:
    """The configured encoder where it can load (offline encoders always; clip / vlm from a local folder, the
    hub's cache or a reachable hub; aligned with its head file); else None, the offline EfficientNet (logged)."""
    if kind is None or kind in OFFLINE_IMAGE_ENCODERS:
        return kind, None
    if kind == "aligned":
        path = Path(model or "saved/aligner/aligner.pt")
        reason = None if path.is_file() else f"no alignment head at {path}"
    else:
        from dataset_prep.extract_features import default_encoder_model  # FVE's, as the extraction uses it

        model = model or default_encoder_model(kind)
        reason = None if Path(model).expanduser().is_dir() or hub_cached(model) else hub_unreachable()
    if reason is None:
        logger.info("features: image encoder %s %s (the configured fve_encoder)", kind, model)
        return kind, model
    logger.warning("features: the configured image encoder %s %s cannot load (%s): using the offline "
                   "EfficientNet-Lite0 instead (to redo the features with it once it loads: delete "
                   "<data_path>/.prepare/features.json)", kind, model or "", reason)
    return None, None


def hub_cached(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 (an odd name or cache: treat as not cached)
        return False


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used (None when it is reachable)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        probe(endpoint)
    except Unreachable as error:
        return f"not in the local cache and {error}"
    return None
