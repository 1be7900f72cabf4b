"""Image download throughput (``dataset_prep/download_images.py``) against a local HTTP server.

A ``ThreadingHTTPServer`` on 127.0.0.1, in its own process, serves ``--images`` real-size JPEGs
(``--size`` pixels square, ~30-60 KB: a gradient, a few shapes, noise; ``--distinct`` different
pictures, served under as many URLs as there are items) after ``--latency-ms`` per request, as a
CDN's round trip would. Each run downloads all of them into a fresh folder with the downloader's
full checks (content type, size cap, Pillow decode under the pixel limit, atomic write with
fsync), once per value of ``--workers`` (default 1 and 16), ``--repeats`` times in turn; the
table gives images per second (min and median over the runs), the client's CPU time per image
(this process only: the server runs apart) and the median speed-up over the first ``--workers``.

With W workers and latency L the ceiling is about W / L images per second (16 / 50 ms = 320);
on 2 shared CPU cores the decode and write per image (a few ms) cap it lower.

    python benchmarks/bench_download.py                                  # 400 images, 50 ms, 1 vs 16 workers, 3 repeats
    python benchmarks/bench_download.py --images 80 --repeats 2          # quicker
    python benchmarks/bench_download.py --workers 1 4 16 --latency-ms 100
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the table's lines
from dataset_prep.download_images import download


def draw_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    ramp = ((x + y) / (2 * size))[..., None]
    pictures = []
    for _ in range(count):
        start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        pixels = start * (1 - ramp) + end * ramp + rng.normal(0, 10, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            left, right = sorted(rng.integers(0, size, 2))
            top, bottom = sorted(rng.integers(0, size, 2))
            draw.ellipse([left, top, right, bottom], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        pictures.append(buffer.getvalue())
    return pictures


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # 16 workers connect at once; the default backlog of 5 can drop SYNs


def serve(pictures: list[bytes], latency: float, port_queue) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (/img/<n>.jpg)
            time.sleep(latency)
            try:
                data = pictures[int(self.path.rsplit("/", 1)[1].split(".")[0]) % len(pictures)]
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with _Server(("127.0.0.1", 0), Handler) as httpd:
        port_queue.put(httpd.server_address[1])
        httpd.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="items to download per run (default 400)")
    parser.add_argument("--distinct", type=int, default=32, help="different pictures among them (default 32)")
    parser.add_argument("--size", type=int, default=500, help="picture side in pixels (default 500)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="server delay per request (default 50)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16],
                        help="worker counts to compare (default 1 16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count (default 3)")
    args = parser.parse_args(argv)

    pictures = draw_jpegs(min(args.distinct, args.images), args.size)
    sizes = [len(p) for p in pictures]
    context = multiprocessing.get_context("fork")
    port_queue = context.Queue()
    server = context.Process(target=serve, args=(pictures, args.latency_ms / 1000, port_queue), daemon=True)
    server.start()
    try:
        base = f"http://127.0.0.1:{port_queue.get(timeout=30)}"
        print(f"{args.images} JPEGs of {args.size}x{args.size} px ({min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB, "
              f"{len(pictures)} distinct), server latency {args.latency_ms:g} ms, {args.repeats} repeats, "
              f"{os.cpu_count()} CPUs")
        seconds: dict[int, list[float]] = {w: [] for w in args.workers}
        cpu: dict[int, list[float]] = {w: [] for w in args.workers}
        with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
            folder = Path(tmp)
            (folder / "bench.images.tsv").write_text(
                "item_id\timage_urls\n" + "".join(f"item{i:05d}\t{base}/img/{i}.jpg\n" for i in range(args.images))
            )
            for repeat in range(args.repeats):
                for workers in args.workers:
                    target = folder / f"images_{repeat}_{workers}"
                    cpu_start, wall_start = time.process_time(), time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        result = download(folder, "bench", images_dir=target, workers=workers, retries=0, timeout=30)
                    wall, used = time.perf_counter() - wall_start, time.process_time() - cpu_start
                    if result["downloaded"] != args.images:
                        raise SystemExit(f"error: {result['downloaded']} of {args.images} downloaded ({result})")
                    seconds[workers].append(wall)
                    cpu[workers].append(used)
    finally:
        server.terminate()
        server.join(10)

    first = args.workers[0]
    reference = args.images / statistics.median(seconds[first])
    print(f"{'workers':>7}  {'min img/s':>9}  {'median img/s':>12}  {'median s':>8}  "
          f"{'CPU ms/img':>10}  {'speed-up':>8}")
    for workers in args.workers:
        rates = [args.images / s for s in seconds[workers]]
        median_rate = statistics.median(rates)
        print(f"{workers:>7}  {min(rates):>9.1f}  {median_rate:>12.1f}  {statistics.median(seconds[workers]):>8.2f}  "
              f"{1000 * statistics.median(cpu[workers]) / args.images:>10.1f}  {median_rate / reference:>7.1f}x")


if __name__ == "__main__":
    main()
