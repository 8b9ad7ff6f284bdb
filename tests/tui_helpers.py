"""What the dashboard tests share: copies of a generated database, waiting on a condition
under Pilot (and before a snapshot), and reading what a widget shows (their fixtures are in
conftest.py)."""

from __future__ import annotations

import io
import shutil
import sqlite3
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text
from textual.widgets import Static


def copy_db(source: Path, target: Path) -> Path:
    """A consistent copy of a WAL database (the backup API, not a file copy), with its data
    folder (vector and activation files, named relative to it)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    data = source.parent / f"{source.stem}.data"
    if data.exists():
        shutil.copytree(data, target.parent / f"{target.stem}.data")
    return target


async def wait_for(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.1)


def settle(app, keys: list[str]):
    """A snapshot's ``run_before``: wait until the workers of the first screen's load are
    done, then press ``keys`` one by one, each time waiting until the workers it started
    are done, so the picture shows loaded data, not "loading…" (a fixed pause was not
    always enough on a busy 2-core machine)."""

    async def workers_done(pilot) -> None:
        for _ in range(100):
            await pilot.pause(0.1)
            if not [w for w in app.workers if w.is_running]:
                break

    async def run_before(pilot) -> None:
        await pilot.pause(0.3)
        await workers_done(pilot)
        for key in keys:
            await pilot.press(key)
            await workers_done(pilot)
        await pilot.pause(0.3)

    return run_before


def text_of(app, selector: str) -> str:
    """What a Static shows, as plain text (tables rendered through a Rich console)."""
    content = app.screen.query_one(selector, Static).content
    if isinstance(content, str | Text):
        return str(content)
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(content)
    return console.export_text()
