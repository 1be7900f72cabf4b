"""Download each item's main image listed in ``<name>.images.tsv`` into ``<dataset dir>/images/``.

Input: ``<dir>/<name>.images.tsv`` as ``convert_amazon.py`` writes it (``item_id<TAB>image_urls``,
URLs separated by spaces, the main image first). ``http://`` and ``https://`` URLs are fetched;
a plain path (as ``make_synthetic.py`` writes, relative to the dataset folder) is already local
and only checked. Any other scheme (``file://``, ``ftp://``, ...) is refused.

Output: ``<dir>/images/<item>.<jpg|png|webp>`` (the layout FVE reads, config key ``image_dir``),
each written atomically after Pillow has decoded it (GIFs become PNGs), so a file that exists is
a whole, valid image; and ``<dir>/<name>.images_failed.tsv`` (``item_id<TAB>url<TAB>reason``) for
the items that could not be fetched, each also logged as one line on stderr. The run is
resumable: items whose image file already exists are skipped (and temporary files left by a
killed run are removed). For each item the URLs are tried in order (``--all-urls``; default: the
main one only); ``--workers`` downloads run at once.

Safety, since the URLs and the servers are not ours:

* redirects are followed to ``http(s)://`` URLs only (urllib's default would also follow ``ftp://``);
* each request has a timeout (``--timeout``: seconds without data) and each download a total
  deadline (``--deadline``), checked between chunks of the body, so a server trickling bytes
  cannot hold a worker for long;
* bodies over ``--max-bytes`` are refused (from ``Content-Length``, or once the stream passes it);
* the ``Content-Type`` must be ``image/*``, ``application/octet-stream`` or absent;
* the bytes must decode with Pillow under a pixel limit (``reveal_recbole.image_io``: empty,
  truncated or undecodable files and decompression bombs are refused before anything is written);
* only transient errors (timeouts, dropped connections, HTTP 5xx and 429) are retried, up to
  ``--retries`` times with exponential back-off (``--backoff`` seconds, doubling); an HTTP 4xx, a
  refused redirect, a size, type or image refusal fails the item at once.

Usage::

    python dataset_prep/download_images.py --dir dataset/sports_raw --name sports_raw --workers 16
"""
from __future__ import annotations

import argparse
import http.client
import io
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from tqdm.contrib.logging import logging_redirect_tqdm

from dataset_prep.common import progress
from reveal_recbole.atomic import atomic_write_bytes, atomic_write_text
from reveal_recbole.image_io import ImageRejected, decode_image

logger = logging.getLogger(__name__)

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".png"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
USER_AGENT = "reveal-recbole-dataset-prep/0.1 (research; image download)"
REMOTE_SCHEMES = ("http", "https")
ACCEPTED_TYPES = ("application/octet-stream", "binary/octet-stream")  # besides image/*; S3 sends binary/...
MAX_BYTES = 20_000_000
CHUNK = 64 * 1024
# what atomic_write_bytes leaves behind when the process is killed between mkstemp and rename
STALE_TMP = re.compile(r"\..+\.(?:png|jpg|jpeg|webp)\.[A-Za-z0-9_]+\.tmp")


class Refused(Exception):
    """The download is refused for a reason that a retry will not change."""


class TransientError(Exception):
    """A network failure that may go away: retried with back-off."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (the base class also follows ftp://)."""

    max_redirections = 5

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location is not None:
            target = urljoin(req.full_url, location.strip())
            if urlsplit(target).scheme.lower() not in REMOTE_SCHEMES:
                fp.close()
                raise Refused(f"redirect to non-http URL {target} refused")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _build_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) only: no file://, ftp:// or data: handlers at all."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),  # honours http(s)_proxy / no_proxy, as urlopen does
        urllib.request.UnknownHandler(),  # "unknown url type" for anything else
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


OPENER = _build_opener()


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


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files a killed run left in ``folder``; how many there were."""
    stale = [path for path in folder.glob(".*.tmp") if STALE_TMP.fullmatch(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def fetch(url: str, timeout: float, deadline: float, max_bytes: int) -> bytes:
    """The body at ``url``: raises ``urllib.error.HTTPError`` for an HTTP error status,
    :class:`Refused` (redirect, type, size) or :class:`TransientError` (timeout, deadline, network)."""
    start = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
    try:
        with OPENER.open(request, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type")
            if content_type is not None:
                kind = content_type.split(";", 1)[0].strip().lower()
                if not (kind.startswith("image/") or kind in ACCEPTED_TYPES):
                    raise Refused(f"content type {kind or repr(content_type)} is not an image")
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise Refused(f"Content-Length {int(length):,} bytes is over the limit of {max_bytes:,}")
            chunks, total = [], 0
            while True:
                if time.monotonic() - start > deadline:
                    raise TransientError(f"not done after the deadline of {deadline:g} s ({total:,} bytes read)")
                chunk = response.read1(CHUNK)  # whatever one read brings, so a trickle still reaches the check
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise Refused(f"body passed the limit of {max_bytes:,} bytes")
                chunks.append(chunk)
            if response.length:  # read1 does not raise IncompleteRead when the server closes early
                raise TransientError(f"connection closed after {total:,} bytes, {response.length:,} short")
            return b"".join(chunks)
    except urllib.error.HTTPError as error:
        error.close()
        raise
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise TransientError(f"timed out (no data for {timeout:g} s)") from error
        raise TransientError(f"connection failed: {error.reason}") from error
    except TimeoutError as error:
        raise TransientError(f"timed out (no data for {timeout:g} s)") from error
    except (OSError, http.client.HTTPException) as error:
        raise TransientError(f"connection failed: {type(error).__name__}: {error}") from error


def verified_image(data: bytes) -> tuple[bytes, str]:
    """``data`` (re-encoded as PNG if a GIF) and its file suffix; :class:`ImageRejected` if not an image we keep."""
    image = decode_image(data)
    kind = image.format or ""
    if kind not in EXTENSIONS:
        raise ImageRejected(f"unsupported image format {kind!r}")
    if kind == "GIF":  # keep FVE's formats: the first frame, as PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return data, EXTENSIONS[kind]


def _safe_name(item: str) -> bool:
    return bool(item) and not item.startswith(".") and not any(c in item for c in "/\\\0")


def download_item(
    item: str,
    urls: list[str],
    base: Path,
    folder: Path,
    retries: int,
    timeout: float,
    backoff: float,
    deadline: float = 60.0,
    max_bytes: int = MAX_BYTES,
) -> Outcome:
    if not _safe_name(item):
        return Outcome(item, "failed", "item id is not a safe file name", urls[0] if urls else "")
    if existing_image(folder, item) is not None:
        return Outcome(item, "present")
    errors: list[tuple[str, str]] = []
    for url in urls:
        if "://" not in url:  # a local path, relative to the dataset folder
            local = (base / url).resolve()
            if local.is_file() and local.suffix.lower() in IMAGE_SUFFIXES:
                return Outcome(item, "present", url=url)
            errors.append((url, "no such local image"))
            continue
        parts = urlsplit(url)
        if parts.scheme.lower() not in REMOTE_SCHEMES or not parts.netloc:
            errors.append((url, f"unsupported URL (scheme {parts.scheme!r}; only http and https are fetched)"))
            continue
        for attempt in range(1, retries + 2):
            try:
                data, suffix = verified_image(fetch(url, timeout, deadline, max_bytes))
            except urllib.error.HTTPError as error:
                reason, retry = f"HTTP {error.code} {error.reason}", error.code >= 500 or error.code == 429
            except TransientError as error:
                reason, retry = str(error), True
            except (Refused, ImageRejected) as error:
                reason, retry = str(error), False
            except Exception as error:  # noqa: BLE001 (one odd URL or file must not end a long run)
                reason, retry = f"unexpected {type(error).__name__}: {error}", False
            else:
                atomic_write_bytes(folder / f"{item}{suffix}", data)
                return Outcome(item, "downloaded", url=url)
            if not retry or attempt > retries:
                break
            delay = backoff * 2 ** (attempt - 1)
            logger.debug("item %s: %s: %s; retry %d of %d in %.1f s", item, url, reason, attempt, retries, delay)
            time.sleep(delay)
        errors.append((url, reason + (f" (after {attempt} attempts)" if attempt > 1 else "")))
    if len(errors) == 1:
        detail = errors[0][1]
    else:
        detail = "; ".join(f"{url}: {reason}" for url, reason in errors)
    return Outcome(item, "failed", " ".join(detail.split())[:500], urls[0] if urls else "")


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
    deadline: float = 60.0,
    max_bytes: int = MAX_BYTES,
) -> dict:
    start = time.perf_counter()
    rows = read_image_list(folder / f"{name}.images.tsv")[:limit]
    target = images_dir or folder / "images"
    target.mkdir(parents=True, exist_ok=True)
    if removed := remove_stale_temporaries(target):
        logger.info("%s: removed %d temporary files of an interrupted run", target, removed)
    outcomes: list[Outcome] = []
    with logging_redirect_tqdm(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [
            pool.submit(download_item, item, urls if all_urls else urls[:1], folder, target, retries, timeout,
                        backoff, deadline, max_bytes)
            for item, urls in rows
        ]
        for future in progress(as_completed(futures), "download images", total=len(futures), unit="images"):
            outcome = future.result()
            if outcome.status == "failed":
                logger.warning("item %s: %s failed: %s", outcome.item, outcome.url, outcome.detail)
            outcomes.append(outcome)
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: o.item)
    failed_path = folder / f"{name}.images_failed.tsv"
    if failed:
        lines = ["item_id\turl\treason", *(f"{o.item}\t{o.url}\t{o.detail}" for o in failed)]
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
    parser.add_argument("--retries", type=int, default=2,
                        help="retries per URL after a transient error: timeout, network, HTTP 5xx/429 (default 2)")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="seconds before the first retry, doubling (default 1)")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds a request may go without data (default 20)")
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="seconds one download may take in all (default 60)")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                        help=f"largest image accepted (default {MAX_BYTES:,})")
    parser.add_argument("--all-urls", action="store_true",
                        help="fall back to an item's other URLs when the main one fails")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items (a trial run)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return download(args.dir, args.name, args.images_dir, args.workers, args.retries, args.timeout, args.backoff,
                        all_urls=args.all_urls, limit=args.limit, deadline=args.deadline, max_bytes=args.max_bytes)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
