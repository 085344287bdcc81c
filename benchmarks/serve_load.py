"""Load benchmark of the web app (``tumorseg serve``): latency, 503s and server memory under
concurrent uploads, with and without worst-case images mixed in.

    python benchmarks/serve_load.py [--requests 100] [--concurrency 16] [--bad-fraction 0.1]
                                    [--model weights/umobilenetv2-figshare.keras] [--out FILE]

Each scenario starts the real server in a fresh process (``tumorseg serve --model M --port P``,
default pool: 1 worker, 8 waiting uploads, Retry-After 5 s), waits for ``GET /health``, then sends
``--requests`` uploads with ``--concurrency`` clients (httpx, one asyncio loop; each client sends
its next upload as soon as the previous one is answered). Scenarios:

* ``baseline``: normal uploads only (256x256 grayscale PNG slices from
  ``../shared/data/figshare-256/images`` when present, else ``tumorseg.data.synthetic`` phantoms);
* ``mixed``: the same, with ``--bad-fraction`` of the uploads replaced by worst-case files made
  like ``benchmarks/decode_peak_rss.py`` (its generators are imported): a 1 KB RLE BMP declaring
  20000x20000, a 16-bit RGBA PNG of zeros 6300x6300 (under the 40 MP pixel limit, over the decode
  budget) and a PNG header declaring 60000x60000. They should get 422 without being decoded.

A 503 answer is retried like a polite client would: after its ``Retry-After`` seconds, at most
``--max-attempts`` attempts per upload (``--max-attempts 1``: never retried). Without that, the
clients beyond the pool's capacity would spin on 503 answers and use up the request budget in a
second. Every attempt is recorded; an upload's final status is that of its last attempt.

Reported per scenario and kind of upload: uploads, attempts, final statuses (200 / 4xx / 503),
503 answers (and how many carried ``Retry-After``), latency p50/p95/max of the attempts that got
200 (queueing included) and of the whole upload (retry waits included), the server's own
``elapsed_ms``, uploads/s, and the server's RSS (psutil, process + children): before the load
(idle, after start-up), peak (sampled every 50 ms during the load) and after (2 s after the last
answer). Results go to ``benchmarks/results/serve_load.json`` with the machine, the foreign CPU
load (:class:`common.ForeignCpu`) and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROJECT_ROOT, RESULTS_DIR, ForeignCpu, cli_command, env_for_subprocess, load_average, log, ratio, result_payload, save_model_in_subprocess  # noqa: E402
from decode_peak_rss import png_of_zeros, rle_bmp  # noqa: E402

DEFAULT_MODEL = PROJECT_ROOT / "weights" / "umobilenetv2-figshare.keras"
FIGSHARE_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "figshare-256" / "images"
NORMAL_POOL = 24  # distinct normal slices, cycled through
SAMPLE_EVERY_S = 0.05
SETTLE_AFTER_S = 2.0
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 180.0

# kind -> (file name, content type, what it is, how to make it)
BAD_KINDS: dict[str, tuple[str, str, str, Any]] = {
    "rle_bmp_400mp": ("bomb.bmp", "image/bmp", "RLE8 BMP declaring 20000x20000 (1 KB)", lambda: rle_bmp(20_000, 20_000)),
    "rgba16_png_39mp": (
        "rgba16.png",
        "image/png",
        "16-bit RGBA PNG of zeros, 6300x6300 = 39.7 MP (under the 40 MP limit, over the decode budget)",
        lambda: png_of_zeros(6300, 6300),
    ),
    "png_header_3600mp": (
        "huge.png",
        "image/png",
        "8-bit PNG header declaring 60000x60000, 10 rows of data",
        lambda: png_of_zeros(60_000, 60_000, bit_depth=8, colour_type=0, rows=10),
    ),
}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def normal_uploads(count: int, seed: int) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """``count`` distinct 256x256 grayscale PNG slices: real ones when the data is here, else phantoms."""
    files = sorted(FIGSHARE_IMAGES.glob("*.png")) if FIGSHARE_IMAGES.is_dir() else []
    if files:
        chosen = random.Random(seed).sample(files, min(count, len(files)))
        uploads = [(path.name, path.read_bytes()) for path in chosen]
        return uploads, {"kind": "figshare-256", "path": str(FIGSHARE_IMAGES), "files": [name for name, _ in uploads]}
    from tumorseg.data.synthetic import phantom_for_index
    from tumorseg.io import encode_png

    uploads = [(f"phantom-{i}.png", encode_png(phantom_for_index(seed, i, 256)[0])) for i in range(count)]
    return uploads, {"kind": "synthetic phantoms (tumorseg.data.synthetic, 256x256)", "seed": seed}


def request_plan(n: int, bad_fraction: float, seed: int) -> list[str]:
    """The kinds of the ``n`` uploads in sending order: normal, plus the bad kinds in turn, shuffled."""
    bad = round(n * bad_fraction)
    names = list(BAD_KINDS)
    plan = ["normal"] * (n - bad) + [names[i % len(names)] for i in range(bad)]
    random.Random(seed).shuffle(plan)
    return plan


def ensure_model(model: Path, scratch: Path) -> tuple[Path, str]:
    if model.is_file():
        return model, "file"
    fallback = scratch / "umobilenetv2-untrained-256.keras"
    log(f"{model} is missing: building an untrained UMobileNetV2 at 256x256 instead")
    save_model_in_subprocess(fallback, "umobilenetv2", 256)
    return fallback, "untrained umobilenetv2 256x256 (shipped file missing)"


# --------------------------------------------------------------------------------------------
# The server and its memory
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``tumorseg serve`` in a child process; its log goes to a temporary file."""

    def __init__(self, model: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.TemporaryFile()
        command = cli_command("serve", "--model", str(model), "--port", str(self.port), *extra)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env_for_subprocess(), stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self) -> tuple[float, dict[str, Any]]:
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(trust_env=False, timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode} while starting:\n{self.log_tail()}")
                try:
                    answer = client.get(self.url + "/health")
                    if answer.status_code == 200:
                        return time.perf_counter() - self.started, answer.json()
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server did not answer /health within {STARTUP_TIMEOUT_S:g} s:\n{self.log_tail()}")
                time.sleep(0.25)

    def log_tail(self, chars: int = 3000) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")[-chars:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        self.log_file.close()
        return code


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler(threading.Thread):
    """The server tree's RSS every ``SAMPLE_EVERY_S`` until stopped: peak and sample count."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.peak = 0
        self.peak_at = 0.0
        self.samples = 0
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = tree_rss(self.pid)
            self.samples += 1
            if rss > self.peak:
                self.peak, self.peak_at = rss, time.perf_counter() - self._t0
            self._halt.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --------------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------------


async def _send_all(
    url: str,
    plan: list[str],
    normals: list[tuple[str, bytes]],
    bad: dict[str, bytes],
    concurrency: int,
    max_attempts: int,
    gradcam: bool,
) -> list[dict[str, Any]]:
    import httpx

    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for index, kind in enumerate(plan):
        queue.put_nowait((index, kind))
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()

    async with httpx.AsyncClient(trust_env=False, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one_client() -> None:
            while True:
                try:
                    index, kind = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if kind == "normal":
                    name, data = normals[index % len(normals)]
                    content_type = "image/png"
                else:
                    name, content_type = BAD_KINDS[kind][0], BAD_KINDS[kind][1]
                    data = bad[kind]
                record: dict[str, Any] = {"index": index, "kind": kind, "attempts": [], "start_s": time.perf_counter() - t0}
                for attempt in range(max_attempts):
                    started = time.perf_counter()
                    try:
                        answer = await client.post(url + "/predict", params={"gradcam": str(gradcam).lower()}, files={"file": (name, data, content_type)})
                        status, retry_after = answer.status_code, answer.headers.get("retry-after")
                        body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
                        server_ms = body.get("elapsed_ms") if status == 200 else None
                        detail = None if status in (200, 503) else str(body.get("detail", answer.text))[:200]
                    except httpx.HTTPError as exc:
                        status, retry_after, server_ms, detail = f"error: {type(exc).__name__}", None, None, str(exc)[:200]
                    attempt_row = {
                        "status": status,
                        "sent_s": round(started - t0, 4),
                        "latency_ms": round(1000.0 * (time.perf_counter() - started), 1),
                        "retry_after": retry_after,
                        "server_ms": server_ms,
                    }
                    if detail is not None:
                        attempt_row["detail"] = detail
                    record["attempts"].append(attempt_row)
                    if status != 503 or attempt == max_attempts - 1:
                        break
                    await asyncio.sleep(float(retry_after) if retry_after else 1.0)
                record["final_status"] = record["attempts"][-1]["status"]
                record["total_ms"] = round(1000.0 * (time.perf_counter() - t0) - 1000.0 * record["start_s"], 1)
                records.append(record)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r["index"])


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return round(ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))], 1)

    return {"p50": round(statistics.median(ordered), 1), "p95": pick(0.95), "max": round(ordered[-1], 1), "n": len(ordered)}


def _status_class(status: Any) -> str:
    if status == 200:
        return "200"
    if status == 503:
        return "503"
    if isinstance(status, int) and 400 <= status < 500:
        return "4xx"
    return "other"


def busy_seconds(attempts: list[dict[str, Any]]) -> float:
    """Length of the union of the attempts' [sent, answered] intervals: the time the server had
    work, without the stretches where every remaining client was only waiting out a Retry-After."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((a["sent_s"], a["sent_s"] + a["latency_ms"] / 1000.0) for a in attempts):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarise(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in records}, key=lambda k: (k != "normal", k)):
        mine = [r for r in records if r["kind"] == kind]
        attempts = [a for r in mine for a in r["attempts"]]
        finals = Counter(_status_class(r["final_status"]) for r in mine)
        row = {
            "uploads": len(mine),
            "attempts": len(attempts),
            "final": {key: finals.get(key, 0) for key in ("200", "4xx", "503", "other")},
            "final_status_codes": dict(Counter(str(r["final_status"]) for r in mine)),
            "answers_503": sum(a["status"] == 503 for a in attempts),
            "answers_503_with_retry_after": sum(a["status"] == 503 and a["retry_after"] is not None for a in attempts),
            "uploads_that_got_a_503": sum(any(a["status"] == 503 for a in r["attempts"]) for r in mine),
        }
        ok = [a for a in attempts if a["status"] == 200]
        row["latency_ms_200"] = _percentiles([a["latency_ms"] for a in ok])
        row["server_elapsed_ms_200"] = _percentiles([a["server_ms"] for a in ok if a["server_ms"] is not None])
        row["upload_total_ms_200"] = _percentiles([r["total_ms"] for r in mine if r["final_status"] == 200])
        rejected = [a["latency_ms"] for a in attempts if a["status"] != 200]
        row["latency_ms_non_200"] = _percentiles(rejected)
        details = [a["detail"] for a in attempts if "detail" in a]
        if details:
            row["first_error_detail"] = details[0]
        by_kind[kind] = row
    attempts = [a for r in records for a in r["attempts"]]
    finals = Counter(_status_class(r["final_status"]) for r in records)
    busy = busy_seconds(attempts)
    return {
        "seconds": round(seconds, 2),
        "uploads": len(records),
        "attempts": len(attempts),
        "uploads_per_s": round(len(records) / seconds, 2),
        "attempts_per_s": round(len(attempts) / seconds, 2),
        "ok_per_s": round(sum(a["status"] == 200 for a in attempts) / seconds, 2),
        "busy_seconds": round(busy, 2),
        "ok_per_busy_s": round(sum(a["status"] == 200 for a in attempts) / busy, 2) if busy else None,
        "final": {key: finals.get(key, 0) for key in ("200", "4xx", "503", "other")},
        "answers_503": sum(a["status"] == 503 for a in attempts),
        "answers_503_with_retry_after": sum(a["status"] == 503 and a["retry_after"] is not None for a in attempts),
        "by_kind": by_kind,
    }


def run_scenario(name: str, model: Path, plan: list[str], normals: list[tuple[str, bytes]], bad: dict[str, bytes], args: argparse.Namespace) -> dict[str, Any]:
    mib = 1 / 2**20
    server = Server(model, [])
    try:
        startup_s, health = server.wait_ready()
        time.sleep(1.0)  # let start-up allocations settle
        before = tree_rss(server.process.pid)
        log(
            f"{name}: server up in {startup_s:.1f} s ({health['model']}, input {health['input_size']}), RSS {before * mib:.0f} MiB; "
            f"{len(plan)} uploads, {args.concurrency} clients"
        )
        sampler = RssSampler(server.process.pid)
        sampler.start()
        started = time.perf_counter()
        records = asyncio.run(_send_all(server.url, plan, normals, bad, args.concurrency, args.max_attempts, not args.no_gradcam))
        seconds = time.perf_counter() - started
        time.sleep(SETTLE_AFTER_S)
        sampler.stop()
        after = tree_rss(server.process.pid)
        alive = server.process.poll() is None
    finally:
        exit_code = server.stop()
    result = summarise(records, seconds)
    result["memory_mib"] = {
        "before": round(before * mib, 1),
        "peak": round(max(sampler.peak, after) * mib, 1),
        "after": round(after * mib, 1),
        "peak_at_s": round(sampler.peak_at, 2),
        "samples": sampler.samples,
    }
    result["server"] = {"startup_s": round(startup_s, 1), "health": health, "alive_after_load": alive, "exit_code": exit_code}
    result["requests"] = records
    normal = result["by_kind"].get("normal", {})
    log(
        f"{name}: {seconds:.1f} s, final {result['final']}, 503 answers {result['answers_503']}, normal 200 p50/p95 "
        f"{normal.get('latency_ms_200', {}).get('p50')}/{normal.get('latency_ms_200', {}).get('p95')} ms, "
        f"RSS {result['memory_mib']['before']:.0f}/{result['memory_mib']['peak']:.0f}/{result['memory_mib']['after']:.0f} MiB"
    )
    return result


def table(scenarios: dict[str, dict[str, Any]], concurrency: int) -> str:
    lines = [
        "| scenario | uploads (attempts) | concurrency | final 200 / 4xx / 503 | 503 answers (with Retry-After) "
        "| normal 200 p50 / p95 / max ms | normal server ms p50 | 200s/s while busy | wall s | RSS MiB before / peak / after |",
        "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for name, s in scenarios.items():
        lat = s["by_kind"].get("normal", {}).get("latency_ms_200", {})
        server = s["by_kind"].get("normal", {}).get("server_elapsed_ms_200", {})
        m = s["memory_mib"]
        lines.append(
            f"| {name} | {s['uploads']} ({s['attempts']}) | {concurrency} | {s['final']['200']} / {s['final']['4xx']} / {s['final']['503']}"
            f"{' (+' + str(s['final']['other']) + ' other)' if s['final']['other'] else ''} | {s['answers_503']} ({s['answers_503_with_retry_after']}) "
            f"| {lat.get('p50')} / {lat.get('p95')} / {lat.get('max')} | {server.get('p50')} | {s['ok_per_busy_s']} | {s['seconds']:.1f} "
            f"| {m['before']:.0f} / {m['peak']:.0f} / {m['after']:.0f} |"
        )
    bad_rows = [(name, kind, row) for name, s in scenarios.items() for kind, row in s["by_kind"].items() if kind != "normal"]
    if bad_rows:
        lines += ["", "| scenario | bad kind | uploads | final statuses | latency p50 / max ms (all answers) |", "| --- | --- | ---: | --- | --- |"]
        for name, kind, row in bad_rows:
            lat = row["latency_ms_non_200"]
            lines.append(f"| {name} | {kind} | {row['uploads']} | {row['final_status_codes']} | {lat['p50']} / {lat['max']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="uploads per scenario (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default: %(default)s)")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of worst-case uploads in the mixed scenario (default: %(default)s)")
    parser.add_argument(
        "--max-attempts", type=int, default=4, help="attempts per upload; a 503 is retried after its Retry-After (default: %(default)s; 1 = never retry)"
    )
    parser.add_argument("--scenarios", nargs="+", choices=("baseline", "mixed"), default=["baseline", "mixed"])
    parser.add_argument("--no-gradcam", action="store_true", help="ask for the mask only (the web page asks for Grad-CAM too)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="(default: %(default)s; an untrained UMobileNetV2 at 256x256 if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve_load.json")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_attempts < 1 or not 0.0 <= args.bad_fraction <= 1.0:
        parser.error("--requests, --concurrency and --max-attempts must be at least 1, --bad-fraction in [0, 1]")

    started = time.perf_counter()
    load_start = load_average()
    normals, source = normal_uploads(min(NORMAL_POOL, args.requests), args.seed)
    bad = {kind: make() for kind, (_, _, _, make) in BAD_KINDS.items()}
    plans = {"baseline": request_plan(args.requests, 0.0, args.seed), "mixed": request_plan(args.requests, args.bad_fraction, args.seed)}
    scenarios: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch, ForeignCpu() as foreign:
        model, model_source = ensure_model(args.model, Path(scratch))
        for name in args.scenarios:
            scenarios[name] = run_scenario(name, model, plans[name], normals, bad, args)

    from tumorseg.serve import DEFAULT_QUEUE_LIMIT, DEFAULT_RETRY_AFTER_S, DEFAULT_WORKERS

    ratios = []
    if {"baseline", "mixed"} <= scenarios.keys():
        p95 = [scenarios[s]["by_kind"].get("normal", {}).get("latency_ms_200", {}).get("p95") for s in ("baseline", "mixed")]
        if all(p95):
            ratios.append(ratio("serve load: normal-upload p95 latency, mixed with bad uploads / normal only", p95[1] / p95[0], higher_is_better=False))
    body = {
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "bad_fraction": args.bad_fraction,
            "max_attempts": args.max_attempts,
            "retry_503": "after Retry-After seconds" if args.max_attempts > 1 else "never",
            "gradcam": not args.no_gradcam,
            "seed": args.seed,
            "model": str(model.relative_to(PROJECT_ROOT) if model.is_relative_to(PROJECT_ROOT) else model),
            "model_source": model_source,
            "server": {
                "command": "tumorseg serve --model M --port P",
                "workers": DEFAULT_WORKERS,
                "queue_limit": DEFAULT_QUEUE_LIMIT,
                "retry_after_s": DEFAULT_RETRY_AFTER_S,
            },
            "client": "httpx.AsyncClient, one asyncio loop in the benchmark process (shares the CPU with the server)",
            "rss": f"psutil RSS of the server process and its children; peak sampled every {SAMPLE_EVERY_S * 1000:.0f} ms during the load; "
            f"after = {SETTLE_AFTER_S:g} s after the last answer",
        },
        "data_source": source | {"distinct_normal_slices": len(normals)},
        "bad_kinds": {kind: {"file": f, "content_type": ct, "what": what, "bytes": len(bad[kind])} for kind, (f, ct, what, _) in BAD_KINDS.items()},
        "plan_counts": {name: dict(Counter(plans[name])) for name in args.scenarios},
        "scenarios": scenarios,
        "ratios": ratios,
        "notes": [
            "latency_ms_200: one attempt that got 200, from sending to the full answer (queueing in the server's pool included); "
            "upload_total_ms_200: the whole upload including 503 answers and Retry-After waits.",
        ],
    }
    payload = result_payload("serve_load", quick=args.requests < 100, started=started, load_start=load_start, body=body, foreign=foreign)
    from tumorseg.io import atomic_write_json

    atomic_write_json(args.out, payload)
    print(table(scenarios, args.concurrency))
    print(f"\nforeign CPU {payload['foreign_cpu_fraction']}, quiet machine: {payload['quiet_machine']}; {payload['seconds']:.0f} s; -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
