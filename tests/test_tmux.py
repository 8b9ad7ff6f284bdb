"""The dashboard in a real terminal: tmux runs ``persona tui``, keys go in with send-keys,
the screen comes back with capture-pane."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from db import Store

SCREENS = [("1", "Traits"), ("2", "Jobs"), ("3", "Review"), ("4", "Vectors"), ("5", "Monitor")]


def _capture(session: str) -> str:
    result = subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=False
    )
    return result.stdout


@pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"
)
def test_the_five_screens_in_tmux(tmp_path: Path) -> None:
    db_path = tmp_path / "tmux.db"
    Store(db_path).close()
    session = f"persona-test-{os.getpid()}"
    persona = Path(sys.executable).with_name("persona")
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "100",
            "-y",
            "30",
            str(persona),
            "--db",
            str(db_path),
            "tui",
        ],
        check=True,
        env=env,
    )
    seen = []
    try:
        deadline = time.monotonic() + 60
        while "paternalism" not in _capture(session):
            assert time.monotonic() < deadline, _capture(session)
            time.sleep(0.2)
        for key, title in SCREENS:
            subprocess.run(["tmux", "send-keys", "-t", session, key], check=True)
            deadline = time.monotonic() + 20
            while f"{title}—" not in _capture(session) and f"{title} —" not in _capture(session):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            else:
                seen.append(title)
        assert seen == [title for _, title in SCREENS], _capture(session)
    finally:
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=False)
        time.sleep(0.5)
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)
