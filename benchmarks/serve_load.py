"""`clothcli serve` under load, side by side in one run: the batching server, the same server calling the
model one image at a time (`--max-batch 1`), and the `predict` command over the same files (the ceiling
on this machine). Loopback only, bounded in requests and seconds.

    python benchmarks/serve_load.py model.onnx --data ../shared/datasets/clothing-dataset-small/validation \\
        [--clients 32] [--seconds 60] [--bad-share 0.1] [--json F]

Each client posts one dataset image per request (the raw bytes as the body) and waits for the answer;
with `--bad-share`, that share of requests posts a broken file (a truncated JPEG or a text file) and
must get a 4xx. Every good answer is checked against `clothcli predict`'s row for the same file (same
labels, probabilities within 1e-4). The load generator runs in this process, on the same 2 cores: its
CPU time is reported beside the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of a process, in MiB (from /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / 100.0  # utime + stime, in clock ticks of 1/100 s


def expected_answers(model: Path, files: list[Path], scratch: Path) -> tuple[dict[str, dict], float]:
    """predict's row per file, and the images/s of the whole predict command over the files."""
    out = scratch / "predict.csv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clothcli", "predict", str(model), *map(str, files), "--top-k", "3",
                    "-o", str(out)], check=True, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    with open(out, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}, len(files) / seconds


def agrees(answer: dict, row: dict) -> bool:
    for k, entry in enumerate(answer["top_k"], start=1):
        suffix = "" if k == 1 else f"_{k}"
        if (
            entry["label"] != row[f"label{suffix}"]
            or abs(entry["probability"] - float(row[f"confidence{suffix}"])) > 1e-4
        ):
            return False
    return answer["label"] == row["label"]


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the cheapest client Python has, so that the
    load generator takes as little as it can of the cores the server runs on (httpx took 5.6 ms of CPU
    per request, as much as the server)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        length, closing = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                closing = True
        payload = await self.reader.readexactly(length)
        if closing:
            self.close()
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(base: str, files: list[Path], bodies: dict[Path, bytes], bad: list[bytes], clients: int,
               seconds: float, bad_share: float, expected: dict[str, dict]) -> dict:  # fmt: skip
    latencies, statuses, mismatches = [], {}, 0
    bad_answers = {"4xx": 0, "other": 0}
    deadline = time.perf_counter() + seconds
    host, port = base.removeprefix("http://").split(":")

    async def client(seed: int) -> None:
        nonlocal mismatches
        rng = random.Random(seed)
        connection = Connection(host, int(port))
        while time.perf_counter() < deadline:
            broken = rng.random() < bad_share
            path = rng.choice(files)
            body = rng.choice(bad) if broken else bodies[path]
            start = time.perf_counter()
            try:
                status, payload = await connection.post("/predict", body)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:  # reported, and the client goes on
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                connection.close()
                continue
            elapsed = time.perf_counter() - start
            statuses[status] = statuses.get(status, 0) + 1
            if broken:
                bad_answers["4xx" if 400 <= status < 500 else "other"] += 1
                continue
            latencies.append(elapsed)
            if status == 200 and not agrees(json.loads(payload)["results"][0], expected[str(path)]):
                mismatches += 1
        connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    good = np.asarray(latencies) * 1000.0
    served = sum(v for k, v in statuses.items() if k == 200)
    return {"wall_s": wall, "requests": sum(statuses.values()), "images_per_s": served / wall,
            "p50_ms": float(np.percentile(good, 50)), "p99_ms": float(np.percentile(good, 99)),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)}, "mismatches": mismatches,
            "bad": bad_answers}  # fmt: skip


def run_server(model: Path, files: list[Path], bodies: dict, bad: list[bytes], args: argparse.Namespace,
               expected: dict, *options: str) -> dict:  # fmt: skip
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - a file, not a pipe: a full pipe would stall the server
    command = [sys.executable, "-m", "clothcli", "serve", str(model), "--port", str(port), *options]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        start_rss = rss_mb(server.pid)
        server_cpu = cpu_seconds(server.pid)
        own_cpu = resource.getrusage(resource.RUSAGE_SELF)
        samples: list[float] = []
        sampling = threading.Event()

        def sample_rss() -> None:  # every 5 s while the load runs: is memory flat under load?
            while not sampling.wait(5.0):
                samples.append(rss_mb(server.pid)[0])

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        found = asyncio.run(load(base, files, bodies, bad, args.clients, args.seconds, args.bad_share, expected))
        sampling.set()
        sampler.join()
        found["rss_mb_during"] = samples
        used = resource.getrusage(resource.RUSAGE_SELF)
        found["server_cpu_s"] = cpu_seconds(server.pid) - server_cpu
        found["client_cpu_s"] = (used.ru_utime + used.ru_stime) - (own_cpu.ru_utime + own_cpu.ru_stime)
        found["rss_mb_start"], found["peak_rss_mb_start"] = start_rss
        found["rss_mb_end"], found["peak_rss_mb_end"] = rss_mb(server.pid)
        stats = httpx.get(base + "/stats", timeout=10).json()
        found["batches"] = stats["batch_sizes"]
        found["ms_per_image"] = {stage: 1000.0 * t / max(stats["images"], 1) for stage, t in stats["seconds"].items()}
    finally:
        server.terminate()
        found_code = server.wait(timeout=60)
    found["exit_code"] = found_code
    log.seek(0)
    found["server_stderr"] = log.read().decode(errors="replace")[-2000:]
    log.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bad-share", type=float, default=0.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    bodies = {p: p.read_bytes() for p in files}
    sample = bodies[files[0]]
    bad = [sample[: len(sample) // 3], b"this is a text file, not an image\n" * 20]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        expected, predict_rate = expected_answers(args.model, files, Path(scratch))
    rows = {
        "batched (--max-batch 32)": run_server(args.model, files, bodies, bad, args, expected, "--max-batch", "32"),
        "one image per model call (--max-batch 1)": run_server(
            args.model, files, bodies, bad, args, expected, "--max-batch", "1"
        ),
    }
    print(f"{args.clients} clients for {args.seconds:g} s, {len(files)} images, bad share {args.bad_share:.0%}")
    print("| server | images/s | p50 ms | p99 ms | statuses | wrong answers | server CPU s | client CPU s "
          "| RSS MiB start / end (peak) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['images_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['statuses']} | "
              f"{r['mismatches']} | {r['server_cpu_s']:.0f} | {r['client_cpu_s']:.0f} | {r['rss_mb_start']:.0f} / "
              f"{r['rss_mb_end']:.0f} ({r['peak_rss_mb_end']:.0f}) |")  # fmt: skip
    print(f"| predict command over the same files (start-up included) | {predict_rate:.0f} | | | | | | | |")
    for name, r in rows.items():
        during = ", ".join(f"{m:.0f}" for m in r["rss_mb_during"])
        stages = ", ".join(f"{stage} {ms:.2f}" for stage, ms in r["ms_per_image"].items())
        print(f"{name}: RSS every 5 s under load {during} MiB; wall ms per image in the server: {stages}")
    batched = rows["batched (--max-batch 32)"]
    print(
        f"batched server: {batched['images_per_s'] / predict_rate:.0%} of predict's images/s; "
        f"batch sizes {batched['batches']}; bad files answered 4xx: {batched['bad']}"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "predict_images_per_s": predict_rate, "args": vars(args)},
                                        indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
