"""Attachments: upload throughput, the server's memory during a large upload, and what five
images add to the send path.

    .venv/bin/python bench/attachments.py            # 20 files of 1 MB, one of 20 MB (~30 s)
    .venv/bin/python bench/attachments.py --full     # 100 files of 1 MB, as issue #21 asks
    .venv/bin/python bench/attachments.py --json

A `cortex serve` process on a fresh SQLite file (or `--set CORTEX_DATABASE_URL=...`), the fake
provider in this process, the frame rate burst raised to 1,000 (each upload is one text frame).
Printed:
- uploads: N files of 1 MB one after another over one WebSocket, MB/s (each file distinct text,
  so none is deduplicated);
- one 20 MB upload: MB/s, and the server's RSS before and its peak during it (sampled every
  5 ms from /proc): it must not grow with the file (bytes are stored a 256 KiB chunk at a time);
- the send path: from `send` to the provider receiving the request, for a message with five
  images (2,400 x 1,600 noise PNGs, scaled to 2,048 px for the model) and for the same message
  with none; the median of `--repeat` sends each, and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import children, machine, print_report, proc_status, server_settings, start_cortex
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from cortex.testing.fake_openai import FakeOpenAI, Reply

MB = 1_000_000
PIECE = 512 * 1024


async def answer(ws: ClientConnection, rid: str) -> dict[str, Any]:
    while True:
        event: dict[str, Any] = json.loads(await ws.recv())
        if event.get("request_id") == rid:
            return event


async def upload(ws: ClientConnection, data: bytes, name: str) -> dict[str, Any]:
    rid = f"u-{name}"
    await ws.send(
        json.dumps({"type": "upload", "filename": name, "size": len(data), "request_id": rid})
    )
    for start in range(0, len(data), PIECE):
        await ws.send(data[start : start + PIECE])
    event = await answer(ws, rid)
    if event["type"] != "attachment":
        raise SystemExit(f"upload refused: {event}")
    attachment: dict[str, Any] = event["attachment"]
    return attachment


def text_file(size: int, seed: int) -> bytes:
    line = f"{seed:08d} " + "the quick brown fox jumps over the lazy dog " * 2 + "\n"
    return (line.encode() * (size // len(line) + 1))[:size]


def noise_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(
        out, "PNG", compress_level=1
    )
    return out.getvalue()


async def rss_peak(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, proc_status(pid).get("VmRSS", 0))
        await asyncio.sleep(0.005)
    return max(peak, proc_status(pid).get("VmRSS", 0))


async def send_path(
    ws: ClientConnection, provider: FakeOpenAI, seen: list[float], ids: list[str], n: int
) -> float:
    """Seconds from `send` to the provider's receiving the request."""
    rid = f"s{n}-{len(ids)}"
    frame: dict[str, Any] = {"type": "send", "content": f"describe these {n}", "request_id": rid}
    if ids:
        frame["attachments"] = ids
    before = len(seen)
    started = time.perf_counter()
    await ws.send(json.dumps(frame))
    while True:
        event = json.loads(await ws.recv())
        if event.get("type") == "typing" and not event.get("active"):
            break
    assert len(seen) == before + 1
    return seen[-1] - started


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "files": args.files}
    seen: list[float] = []

    def responder(body: dict[str, Any]) -> Reply:
        seen.append(time.perf_counter())
        return Reply(text="ok")

    async with FakeOpenAI() as provider, children() as started:
        provider.responder = responder
        with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
            settings = {
                "CORTEX_VISION_MODELS": "*",
                "CORTEX_RATE_BURST": "1000",  # 100 `upload` frames in a few seconds
                "CORTEX_ATTACHMENT_QUOTA_BYTES": str(10 * 1024**3),
                "CORTEX_MAX_ATTACHMENT_BYTES": str(max(args.big_mb, 20) * MB),
                **server_settings(args.set),
            }
            server = await start_cortex(Path(tmp), provider.base_url, settings)
            started.append(server)
            async with connect(server.url, max_size=None) as ws:
                files = [text_file(MB, i) for i in range(args.files)]
                t0 = time.perf_counter()
                for i, data in enumerate(files):
                    await upload(ws, data, f"f{i}.txt")
                seconds = time.perf_counter() - t0
                report["small"] = {
                    "mb_per_s": round(args.files / seconds, 1),
                    "seconds": round(seconds, 2),
                }

                big = text_file(args.big_mb * MB, 10**6)
                stop = asyncio.Event()
                baseline = proc_status(server.pid).get("VmRSS", 0)
                sampler = asyncio.create_task(rss_peak(server.pid, stop))
                t0 = time.perf_counter()
                await upload(ws, big, "big.txt")
                seconds = time.perf_counter() - t0
                stop.set()
                peak = await sampler
                report["big"] = {
                    "mb": args.big_mb,
                    "mb_per_s": round(args.big_mb / seconds, 1),
                    "seconds": round(seconds, 2),
                    "rss_before_mb": round(baseline / 1024, 1),
                    "rss_peak_mb": round(peak / 1024, 1),
                    "rss_growth_mb": round((peak - baseline) / 1024, 1),
                }

                images = [noise_png(2400, 1600) for _ in range(5)]
                ids = [
                    (await upload(ws, data, f"img{i}.png"))["id"] for i, data in enumerate(images)
                ]
                with_images, without = [], []
                for n in range(args.repeat):  # interleaved, so drift hits both alike
                    without.append(await send_path(ws, provider, seen, [], n))
                    with_images.append(await send_path(ws, provider, seen, ids, n))
                report["send"] = {
                    "image_mb_each": round(len(images[0]) / MB, 1),
                    "no_attachments_ms": round(statistics.median(without) * 1000, 1),
                    "five_images_ms": round(statistics.median(with_images) * 1000, 1),
                    "added_ms": round(
                        (statistics.median(with_images) - statistics.median(without)) * 1000, 1
                    ),
                }
    return report


def render(report: dict[str, Any]) -> str:
    small, big, send = report["small"], report["big"], report["send"]
    return "\n".join(
        [
            f"{report['files']} uploads of 1 MB: {small['mb_per_s']} MB/s ({small['seconds']} s)",
            f"one {big['mb']} MB upload: {big['mb_per_s']} MB/s; "
            f"server RSS {big['rss_before_mb']} MB before, "
            f"peak {big['rss_peak_mb']} MB during (+{big['rss_growth_mb']} MB)",
            f"send -> provider: {send['no_attachments_ms']} ms with no attachment, "
            f"{send['five_images_ms']} ms with 5 images of {send['image_mb_each']} MB "
            f"(+{send['added_ms']} ms)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20, help="1 MB uploads (default 20)")
    parser.add_argument("--full", action="store_true", help="100 uploads of 1 MB")
    parser.add_argument("--big-mb", type=int, default=20, help="the large upload (default 20)")
    parser.add_argument("--repeat", type=int, default=5, help="sends of each kind (default 5)")
    parser.add_argument("--set", action="append", default=[], metavar="CORTEX_X=VALUE")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    args = parser.parse_args(argv)
    if args.full:
        args.files = 100
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
