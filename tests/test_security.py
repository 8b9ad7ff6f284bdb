"""Security: API keys never reach the database, logs, job params, exports or screenshots;
files follow the user's umask; no shell strings, eval/exec or pickle on user data."""

from __future__ import annotations

import ast
import json
import math
import os
import secrets
import stat
from pathlib import Path

import pytest
from conftest import build_generated_db
from stub_openai import StubServer, anthropic_message, logprob_completion

from db import Store
from db.traits import bundled_traits
from pipeline import api_clients
from pipeline.job_processes import start_worker
from pipeline.judging import JudgeParams, find_or_create_judge_job
from tui.app import PersonaApp
from tui.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("db", "pipeline", "vectors", "tui") for p in (ROOT / d).rglob("*.py")]


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _wait_for_exit(pid: int) -> None:
    os.waitpid(pid, 0)


async def test_a_fake_key_is_never_written_anywhere(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    openai_key = "sk-proj-" + secrets.token_hex(24)
    anthropic_key = "sk-ant-api03-" + secrets.token_hex(24)
    monkeypatch.setenv("OPENAI_API_KEY", openai_key)
    monkeypatch.setenv("ANTHROPIC_API_KEY", anthropic_key)
    monkeypatch.setattr(api_clients, "RETRY_BASE_S", 0.01)
    (tmp_path / "run").mkdir()
    db_path = build_generated_db(tmp_path / "run" / "persona.db", tiny_model_dir)
    exports = tmp_path / "exports"
    trait = {
        k: v
        for k, v in next(t for t in bundled_traits() if t.name == "deception").to_dict().items()
        if k in ("assistant_name", "instruction", "questions", "eval_prompt")
    }

    def server_reply(path: str, body: dict):
        if path.endswith("/messages"):  # Anthropic: the trait author
            return 200, anthropic_message(json.dumps(trait)), {}
        return 200, logprob_completion([("60", math.log(0.7)), ("40", math.log(0.3))]), {}

    with StubServer(server_reply) as server:
        db = ["--db", str(db_path)]
        assert (
            cli_main(
                [*db, "traits", "new", "sly", "--description", "misleading"]
                + ["--author", "anthropic:claude-test", "--base-url", server.root_url]
            )
            == 0
        )
        # Judging in a detached worker, so its log file is written too.
        with Store(db_path) as store:
            params = JudgeParams(judge="openai:stub", base_url=server.base_url)
            job_id = find_or_create_judge_job(store, "paternalism", params)
            _wait_for_exit(start_worker(store, job_id))
            assert store.get_job(job_id).status == "done"
        assert (
            cli_main([*db, "extract", "paternalism", "--judge", "openai:stub", "--threshold", "40"])
            == 0
        )
        assert cli_main([*db, "vectors", "export", "paternalism", "--out", str(exports)]) == 0
        assert cli_main([*db, "traits", "export", "sly", "--out", str(exports / "traits")]) == 0
        assert cli_main([*db, "jobs", "list"]) == 0
    keys_sent = set(server.api_keys)
    assert {openai_key, anthropic_key} <= keys_sent  # the keys were really in play

    # A server that echoes the key in its error message: the job row must not keep it.
    def echo(path: str, body: dict):
        return 401, {"error": {"message": f"Incorrect API key provided: {openai_key}"}}, {}

    with StubServer(echo) as server, Store(db_path) as store:
        params = JudgeParams(judge="openai:echo", base_url=server.base_url)
        job_id = find_or_create_judge_job(store, "paternalism", params)
        _wait_for_exit(start_worker(store, job_id))
        job = store.get_job(job_id)
        assert job.status == "failed" and "answered 401" in job.message
        assert "[OPENAI_API_KEY]" in job.message

    screenshots = tmp_path / "screenshots"
    screenshots.mkdir()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 36)) as pilot:
        for key in "12345":
            await pilot.press(key)
            await pilot.pause(0.5)
            (screenshots / f"screen-{key}.svg").write_text(app.export_screenshot())

    output = capsys.readouterr()
    written = _files_under(tmp_path)
    assert any(p.suffix == ".log" for p in written) and any(p.suffix == ".pt" for p in written)
    assert any(p.suffix == ".svg" for p in written)
    with Store(db_path) as store:  # what SQLite holds, whatever file it sits in
        dump = "\n".join(store.db.conn.iterdump())
        params_text = json.dumps([job.params for job in store.list_jobs()])
    for key in (openai_key, anthropic_key):
        for where, text in [("stdout", output.out), ("stderr", output.err), ("db dump", dump)]:
            assert key not in text, f"the key leaked into {where}"
        assert key not in params_text
        for path in written:
            assert key.encode() not in path.read_bytes(), f"the key leaked into {path}"


# ---- file modes ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_files_follow_the_users_umask(tmp_path: Path, tiny_model_dir: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        db_path = build_generated_db(tmp_path / "persona.db", tiny_model_dir)
        with Store(db_path) as store:
            from pipeline.extract import extract

            extract(store, "paternalism", judge="hand")
        assert (
            cli_main(
                ["--db", str(db_path), "vectors", "export", "paternalism"]
                + ["--out", str(tmp_path / "out")]
            )
            == 0
        )
    finally:
        os.umask(old)
    files = _files_under(tmp_path)
    assert any(p.name.endswith(".safetensors") for p in files)
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & umask == 0, f"{path.name} has mode {mode:o} under umask {umask:o}"
        assert mode & 0o600 == 0o600


# ---- what the code never does ------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return ""


def test_no_shell_strings_eval_exec_or_pickle() -> None:
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle module")
        for call in _calls(tree):
            name = _name(call.func)
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if name in ("eval", "exec", "compile", "os.system", "os.popen"):
                problems.append(f"{where} calls {name}")
            if any(k.arg == "shell" for k in call.keywords):
                problems.append(f"{where} passes shell=")
            command = call.args[0] if call.args else None
            if name.startswith("subprocess.") and not isinstance(command, ast.List | ast.Name):
                problems.append(f"{where} runs a command that is not an argument list")
            if name == "torch.load":
                weights_only = [k for k in call.keywords if k.arg == "weights_only"]
                if not weights_only or getattr(weights_only[0].value, "value", None) is not True:
                    problems.append(f"{where} calls torch.load without weights_only=True")
    assert not problems, problems


# SQL built with f-strings, each reviewed: what it interpolates is ours, never user text.
REVIEWED_SQL_FSTRINGS = {
    ("db/store.py", "PRAGMA busy_timeout"),  # an int constant
    ("db/store.py", "SELECT * FROM judge_cache WHERE key IN"),  # "?, ?, ..." placeholders
    ("db/store.py", "PRAGMA user_version"),  # an int: the schema version
    ("db/store.py", "UPDATE jobs SET"),  # column names from the _JOB_UPDATABLE allowlist
}


def test_sql_is_parameterised() -> None:
    """No SQL text is built from values: f-strings reaching execute/query are an allowlist
    of reviewed ones (placeholders, constants); user input goes through bound parameters."""
    found = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree):
            if _name(call.func).rsplit(".", 1)[-1] not in (
                "execute",
                "executescript",
                "query",
                "executemany",
            ):
                continue
            for arg in call.args[:1]:
                if isinstance(arg, ast.JoinedStr | ast.BinOp) or (
                    isinstance(arg, ast.Call) and _name(arg.func).endswith("format")
                ):
                    text = "".join(
                        v.value
                        for v in ast.walk(arg)
                        if isinstance(v, ast.Constant) and isinstance(v.value, str)
                    )
                    rel = str(path.relative_to(ROOT))
                    match = [r for r in REVIEWED_SQL_FSTRINGS if r[0] == rel and r[1] in text]
                    assert match, f"{rel}:{call.lineno} builds SQL from a string: {text[:60]!r}"
                    found.add(match[0])
    assert found == REVIEWED_SQL_FSTRINGS  # the allowlist holds nothing stale
