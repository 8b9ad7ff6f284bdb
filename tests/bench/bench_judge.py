"""Judging throughput against a stub OpenAI server with fixed latency: the full judging job
(SDK, concurrency limit, cache lookups, SQLite writes) against the ideal rate
in-flight / latency, measured in the same run.

    python tests/bench/bench_judge.py [--n 2000] [--latency 0.05] [--concurrency 64]
        [--processes 1,4,auto]

Target: >= 80% of the ideal rate. The stub runs in its own process so it does not share the
client's interpreter lock. One client process costs ~2 ms of CPU a request in the SDK, so it
tops out near 500 requests/s; ``--processes`` spreads the requests over client processes
(the job's ``processes`` parameter), which needs the cores for them. ``auto`` leaves it
unset, as a job with default flags does (chosen from ``--max-concurrent``, the cores and
the job's size).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _serve(latency: float, port_queue, port: int = 0) -> None:
    """A lean asyncio HTTP/1.1 server (keep-alive, fixed latency, one canned reply). Several
    of them share one port (SO_REUSEPORT), so the measured ceiling is the client's, not the
    stub's."""
    import asyncio
    import json

    from stub_openai import logprob_completion

    payload = json.dumps(logprob_completion([("70", math.log(0.7)), ("80", math.log(0.3))]))
    response = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n{payload}"
    ).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                await asyncio.sleep(latency)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(
            handle, "127.0.0.1", port, backlog=1024, reuse_port=True
        )
        port_queue.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--n", type=int, default=2000, help="judgments (half trait, half coherence)"
    )
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", default="64", help="comma list, e.g. 8,16,32,64")
    parser.add_argument(
        "--processes", default="1", help="comma list of client processes, or auto (unset)"
    )
    parser.add_argument(
        "--stub-processes", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4))
    )
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-real")

    from fake_rows import seed_generation

    from db import Store
    from pipeline.jobs import run_job
    from pipeline.judging import JudgeParams, find_or_create_judge_job

    queue = multiprocessing.Queue()
    servers = []
    port = 0
    for _ in range(args.stub_processes):
        servers.append(
            multiprocessing.Process(target=_serve, args=(args.latency, queue, port), daemon=True)
        )
        servers[-1].start()
        port = queue.get(timeout=30)
    base_url = f"http://127.0.0.1:{port}/v1"
    rows = []
    # One small job first, not measured: imports and first connections are paid once per
    # worker process, not per judgment.
    grid = [(8, 1)] + [
        (int(c), None if p == "auto" else int(p))
        for c in args.concurrency.split(",")
        for p in args.processes.split(",")
    ]
    for run, (concurrency, processes) in enumerate(grid):
        with tempfile.TemporaryDirectory() as tmp:
            db_path = Path(tmp) / "bench.db"
            with Store(db_path) as store:
                seed_generation(store, args.n // 2 if run else 32)
                params = JudgeParams(
                    judge="openai:bench",
                    base_url=base_url,
                    max_concurrent=concurrency,
                    processes=processes,
                )
                job_id = find_or_create_judge_job(store, "paternalism", params)
            cpu = time.process_time()
            start = time.perf_counter()
            run_job(db_path, job_id)
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu
            with Store(db_path) as store:
                done = store.get_job(job_id).done
        if not run:
            continue  # the warm-up
        ideal = concurrency / args.latency
        rows.append(
            {
                "in flight": concurrency,
                "processes": processes or f"auto: {params.client_processes(done)}",
                "judgments": done,
                "seconds": seconds,
                "judgments/s": done / seconds,
                "ideal/s": ideal,
                "ratio": done / seconds / ideal,
                "parent CPU ms/judgment": 1000 * cpu / done,
            }
        )
    for server in servers:
        server.terminate()
    from common import print_table  # imports torch, which a judging worker never loads

    print_table(
        f"bench_judge: {args.n} judgments, {1000 * args.latency:.0f} ms latency, "
        f"{args.stub_processes} stub processes",
        rows,
        list(rows[0]),
    )


if __name__ == "__main__":
    main()
