"""The Review screen at scale: a database of 100,000 responses (50,000 pairs, judged), time
to the first page of pairs and per key while moving down 100 rows, through Pilot.

    python tests/bench/bench_tui.py [--responses 100000] [--moves 100]

Targets: under 1 s to the first paint of the pairs, under 50 ms per key.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402

from db import Store  # noqa: E402
from db.store import utc_now  # noqa: E402


def build(db_path: Path, responses: int) -> None:
    """Rows written with plain executemany: the point is the reading side."""
    with Store(db_path) as store:
        conn = store.db.conn
        now = utc_now()
        jobs = [
            store.create_job("generate", "paternalism", {"side": s, "split": "extract"}).id
            for s in ("pos", "neg")
        ]
        per_side = responses // 2
        with store.transaction():
            for job, side in zip(jobs, ("pos", "neg"), strict=True):
                conn.executemany(
                    "INSERT INTO responses (job, trait, side, split, question, instruction, "
                    "sample, question_text, system_prompt, prompt_ids, answer_ids, answer, "
                    "finish_reason, model, created) VALUES (?, 'paternalism', ?, 'extract', ?, "
                    "?, ?, ?, '', '[1]', '[2]', 'an answer', 'eos', 'm', ?)",
                    (
                        (job, side, i % 20, (i // 20) % 5, i // 100, f"question {i % 20}", now)
                        for i in range(per_side)
                    ),
                )
            conn.execute(
                "INSERT INTO judgments (response, metric, judge, score, created) "
                "SELECT id, 'trait', 'bench', CASE side WHEN 'pos' THEN 40 + id % 60 "
                "ELSE id % 60 END, ? FROM responses",
                [now],
            )
            conn.execute(
                "INSERT INTO judgments (response, metric, judge, score, created) "
                "SELECT id, 'coherence', 'bench', 30 + id % 70, ? FROM responses",
                [now],
            )


async def measure(db_path: Path, moves: int) -> dict[str, float]:
    from tui.app import PersonaApp

    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.2)
        start = time.perf_counter()
        await pilot.press("3")
        table = None
        while True:
            screen = app.screen
            if screen.TITLE == "Review":
                table = screen.query_one("#pairs-table")
                if table.row_count:
                    break
            await pilot.pause(0.005)
        first_paint = time.perf_counter() - start
        # Pilot waits for the app to go idle after each key: measure that floor with a key
        # nothing is bound to, in the same run, and report the move's cost above it.
        floor = []
        for _ in range(20):
            t = time.perf_counter()
            await pilot.press("f20")
            floor.append(time.perf_counter() - t)
        times = []
        for _ in range(moves):
            t = time.perf_counter()
            await pilot.press("down")
            times.append(time.perf_counter() - t)
        return {
            "first paint s": first_paint,
            "median ms/key": 1000 * statistics.median(times),
            "max ms/key": 1000 * max(times),
            "idle-key floor ms": 1000 * statistics.median(floor),
            "ms/key above floor": 1000 * (statistics.median(times) - statistics.median(floor)),
            "rows loaded": table.row_count,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--moves", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "bench.db"
        t = time.perf_counter()
        build(db_path, args.responses)
        print(f"built {args.responses:,} responses in {time.perf_counter() - t:.1f}s")
        row = {"responses": args.responses, **asyncio.run(measure(db_path, args.moves))}
    print_table("bench_tui: Review screen", [row], list(row))


if __name__ == "__main__":
    main()
