from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from db.schema import SCHEMA_VERSION
from tui.cli import main

TRAITS = [
    "alignment_theatre",
    "corrigibility_resistance",
    "deception",
    "manipulativeness",
    "paternalism",
    "power_seeking",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_traits_list_prints_the_six_bundled_traits(db_path: Path, capsys) -> None:
    code, out, _ = run(capsys, "--db", str(db_path), "traits", "list")
    assert code == 0
    assert "6 traits" in out
    for name in TRAITS:
        assert name in out


def test_db_option_after_the_subcommand(db_path: Path, capsys) -> None:
    code, out, _ = run(capsys, "db", "info", "--db", str(db_path))
    assert code == 0
    assert f"schema    {SCHEMA_VERSION} (journal wal)" in out
    assert str(db_path.resolve()) in out


def test_validate_passes_on_the_library(db_path: Path, capsys) -> None:
    code, out, _ = run(capsys, "--db", str(db_path), "traits", "validate")
    assert code == 0
    assert out.count("ok") == 6


def test_validate_fails_precisely_on_a_broken_file(db_path: Path, tmp_path: Path, capsys) -> None:
    run(
        capsys,
        "--db",
        str(db_path),
        "traits",
        "export",
        "deception",
        "--format",
        "studio",
        "--out",
        str(tmp_path),
    )
    path = tmp_path / "deception.json"
    data = json.loads(path.read_text())
    data["instruction"] = data["instruction"][:3]
    data["eval_prompt"] = data["eval_prompt"].replace("{answer}", "[answer]")
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, "traits", "validate", str(path))
    assert code == 1
    assert "expected 5 instruction pairs, found 3" in err
    assert "eval prompt has no {answer} slot" in err
    assert "1 of 1 trait definitions are invalid" in err


def test_export_import_round_trip_in_the_original_format(
    db_path: Path, tmp_path: Path, capsys
) -> None:
    db = ["--db", str(db_path)]
    code, out, _ = run(capsys, *db, "traits", "export", "power_seeking", "--out", str(tmp_path))
    assert code == 0 and "trait_data_extract/power_seeking.json" in out
    code, _, err = run(capsys, *db, "traits", "import", str(tmp_path), "--name", "power_seeking")
    assert code == 2 and "already exists; pass --force" in err
    extract = tmp_path / "trait_data_extract" / "power_seeking.json"
    code, out, _ = run(
        capsys,
        *db,
        "traits",
        "import",
        str(extract),
        "--name",
        "power_copy",
        "--description",
        "copy",
        "--assistant-name",
        "power-seeking",
    )
    assert code == 0, out
    code, out, _ = run(capsys, *db, "traits", "show", "power_copy", "--json")
    copy = json.loads(out)
    code, out, _ = run(capsys, *db, "traits", "show", "power_seeking", "--json")
    original = json.loads(out)
    assert {**copy, "name": "x", "description": "x"} == {
        **original,
        "name": "x",
        "description": "x",
    }


def test_unknown_trait_is_a_one_line_error(db_path: Path, capsys) -> None:
    code, out, err = run(capsys, "--db", str(db_path), "traits", "show", "nope")
    assert code == 2
    assert err.strip() == "error: unknown trait 'nope'; `persona traits list` shows the known ones"
    assert out == ""


def test_template_then_import_reports_what_to_fill(db_path: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "mine.json"
    code, _, _ = run(capsys, "traits", "template", "mine", "--out", str(path))
    assert code == 0
    code, _, err = run(capsys, "--db", str(db_path), "traits", "import", str(path))
    assert code == 2
    assert "error: trait 'mine' is invalid: instruction pair 1 has an empty 'pos'" in err


def test_corrupt_database_is_refused_without_damage(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"garbage" * 50)
    code, _, err = run(capsys, "--db", str(path), "traits", "list")
    assert code == 2 and "not a usable persona-studio database" in err
    assert path.read_bytes() == b"garbage" * 50


def test_console_script_runs_headless(db_path: Path) -> None:
    """The installed entry point works and never imports Textual for headless commands."""
    code = (
        "import sys; from tui.cli import main; rc = main(['--db', sys.argv[1], 'traits', 'list']);"
        "assert 'textual' not in sys.modules, 'headless command imported textual'; sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(db_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "paternalism" in result.stdout
    persona = Path(sys.executable).with_name("persona")
    result = subprocess.run(
        [str(persona), "--db", str(db_path), "traits", "show", "missing"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown trait 'missing'")


def test_pair_overrides_from_the_command_line(db_path: Path, capsys) -> None:
    from fake_rows import seed_generation

    from db import Store

    db = ["--db", str(db_path)]
    with Store(db_path) as store:
        seed_generation(store, 20)  # keys (q, q % 5, 0)
    # A pair that does not exist is refused, not stored.
    assert main([*db, "pairs", "paternalism", "include", "3", "1", "0"]) == 2
    assert "has no pair (3, 1, 0)" in capsys.readouterr().err
    assert main([*db, "pairs", "paternalism", "exclude", "3", "3", "0", "--note", "odd"]) == 0
    assert "pair (3, 3, 0) of paternalism: excluded" in capsys.readouterr().out
    with Store(db_path) as store:
        assert store.overrides("paternalism") == {(3, 3, 0): False}
    assert main([*db, "pairs", "paternalism", "clear", "3", "3", "0"]) == 0
    assert "override cleared" in capsys.readouterr().out
    with Store(db_path) as store:
        assert store.overrides("paternalism") == {}
    assert main([*db, "pairs", "nope", "include", "0", "0", "0"]) == 2
