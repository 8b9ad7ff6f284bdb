"""The look of every screen, as SVG snapshots on a database of its own with clocks, rates and
paths fixed: at 110x32, at 80x24 (every key in the footer, nothing clipped), and the heatmap
in a 16-colour terminal and with NO_COLOR."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from tui_helpers import copy_db, settle

from db import Store
from pipeline.extract import extract
from tui.app import PersonaApp

SCREENS = ["1", "2", "3", "4", "5"]
# The pair view: from Review (3), the table focused, the first pair opened.
PAIR = ["3", "tab", "tab", "tab", "tab", "tab", "enter"]
# Monitor (5): "Hi" answered live with coef 6, then unsteered and steered side by side (s).
COMPARE = ["5", "g", "H", "i", "tab", "6", "shift+tab", "enter", "s"]


@pytest.fixture(scope="module")
def snapshot_source(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A database of its own: what other tests add to the shared one must not show."""
    from conftest import build_generated_db

    db_path = build_generated_db(tmp_path_factory.mktemp("snapshots") / "source.db", tiny_model_dir)
    with Store(db_path) as store:
        extract(store, "paternalism")
    return db_path


@pytest.fixture()
def frozen_db(snapshot_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy whose clocks, rates and paths are fixed, for snapshots (and no GPU pane that
    depends on the machine)."""
    from pipeline import gpu_status

    monkeypatch.setattr(gpu_status, "load_nvml", lambda: None)
    db_path = copy_db(snapshot_source, tmp_path / "snapshot.db")
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE jobs SET heartbeat = '2026-11-26T12:00:00.000+00:00', message = '', "
            """stats = '{"unit": "responses"}', pid = NULL"""
        )
    return db_path


def _app(frozen_db: Path) -> PersonaApp:
    with Store(frozen_db) as store:
        pos = store.responses(side="pos", split="extract")[0]
        neg = next(r for r in store.responses(side="neg") if r.key == pos.key)
    app = PersonaApp(frozen_db, trait="paternalism")
    app.monitor_pair = (pos.id, neg.id)
    return app


@pytest.mark.parametrize("key", SCREENS)
def test_screen_snapshots(snap_compare, frozen_db: Path, key: str) -> None:
    app = _app(frozen_db)
    assert snap_compare(app, terminal_size=(110, 32), run_before=settle(app, [key]))


@pytest.mark.parametrize(
    "keys", [*([k] for k in SCREENS), PAIR, COMPARE], ids=[*SCREENS, "pair", "compare"]
)
def test_80x24_snapshots(snap_compare, frozen_db: Path, keys: list[str]) -> None:
    app = _app(frozen_db)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle(app, keys))


@pytest.mark.parametrize(
    ("keys", "environ"),
    [
        (["5"], {"TERM": "screen"}),
        ([*PAIR, "h"], {"TERM": "screen"}),
        (["5"], {"TERM": "xterm-256color", "NO_COLOR": "1"}),
    ],
    ids=["monitor-16", "pair-heatmap-16", "monitor-no-color"],
)
def test_heatmap_snapshots_in_few_colours(
    snap_compare, frozen_db: Path, keys: list[str], environ: dict, monkeypatch
) -> None:
    monkeypatch.delenv("COLORTERM", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    app = _app(frozen_db)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle(app, keys))
