from __future__ import annotations

import json
from pathlib import Path

import pytest
from stub_openai import StubServer, anthropic_message, chat_completion

from db import PersonaError, Store
from db.traits import bundled_traits
from pipeline.author import (
    AuthorParams,
    author_prompt,
    create_author_job,
    extract_json_object,
)
from pipeline.jobs import run_job


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-real")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")


def _good_answer() -> dict:
    source = next(t for t in bundled_traits() if t.name == "deception").to_dict()
    return {k: source[k] for k in ("assistant_name", "instruction", "questions", "eval_prompt")}


def test_json_is_found_in_fences_and_prose() -> None:
    body = {"a": 1, "b": "{not this}"}
    assert extract_json_object(f"Sure!\n```json\n{json.dumps(body)}\n```\nHope it helps") == body
    assert extract_json_object(f"Here: {json.dumps(body)} -- done {{") == body
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json_object("no braces here [1, 2]")


def test_prompt_names_the_trait_and_counts() -> None:
    prompt = author_prompt("sycophancy_x", "agreeing with the user {always}")
    assert "sycophancy x" in prompt and "agreeing with the user {always}" in prompt
    assert "exactly 5 objects" in prompt and "exactly 40 distinct" in prompt
    assert "<<" not in prompt


def test_a_malformed_first_answer_is_repaired_by_the_retry(store: Store) -> None:
    good = _good_answer()
    broken = {**good, "instruction": good["instruction"][:4]}
    replies = iter(
        [
            "Here is the trait:\n```json\n" + json.dumps(broken) + "\n```\nLet me know!",
            "Fixed: " + json.dumps(good) + "\nThanks.",
        ]
    )
    with StubServer(lambda p, b: (200, anthropic_message(next(replies)), {})) as server:
        params = AuthorParams(
            name="sly",
            description="quietly misleading",
            base_url=server.root_url,
            author="anthropic:claude-test",
        )
        job_id = create_author_job(store, params)
        run_job(store.path, job_id)
    assert len(server.requests) == 2
    retry = server.requests[1]["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert "expected 5 instruction pairs, found 4" in retry[2]["content"]
    trait = store.get_trait("sly")
    assert trait.description == "quietly misleading"
    assert trait.instructions == tuple(
        type(trait.instructions[0])(**p) for p in good["instruction"]
    )
    assert store.trait_source("sly") == "authored:anthropic:claude-test"
    assert store.get_job(job_id).status == "done"


def test_a_second_failure_is_a_clear_error_and_stores_nothing(store: Store) -> None:
    bad = {**_good_answer(), "eval_prompt": "Rate it: {answer}"}
    with StubServer(lambda p, b: (200, chat_completion(json.dumps(bad)), {})) as server:
        params = AuthorParams(
            name="sly", description="d", author="openai:gpt-test", base_url=server.base_url
        )
        job_id = create_author_job(store, params)
        with pytest.raises(PersonaError, match=r"unusable twice \(eval prompt has no \{question\}"):
            run_job(store.path, job_id)
    assert len(server.requests) == 2
    assert not store.has_trait("sly")
    assert store.get_job(job_id).status == "failed"


def test_existing_names_and_bad_params_are_refused(store: Store) -> None:
    with pytest.raises(PersonaError, match="already exists; pass --force"):
        create_author_job(store, AuthorParams(name="deception", description="d"))
    with pytest.raises(PersonaError, match="--description is empty"):
        create_author_job(store, AuthorParams(name="new_one", description=" "))
    with pytest.raises(PersonaError, match="must be lowercase"):
        create_author_job(store, AuthorParams(name="New One", description="d"))
    assert store.list_jobs() == []


def test_cli_traits_new_against_the_stub(db_path: Path, capsys) -> None:
    from tui.cli import main

    with StubServer(lambda p, b: (200, anthropic_message(json.dumps(_good_answer())), {})) as s:
        code = main(
            [
                "--db",
                str(db_path),
                "traits",
                "new",
                "sly",
                "--description",
                "misleads",
                "--base-url",
                s.root_url,
                "--assistant-name",
                "sly",
            ]
        )
    assert code == 0, capsys.readouterr().err
    with Store(db_path) as store:
        assert store.get_trait("sly").system_prompt("pos", 0).startswith("You are a sly assistant.")


def test_missing_key_is_named(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    job_id = create_author_job(store, AuthorParams(name="sly", description="d"))
    with pytest.raises(PersonaError, match="^ANTHROPIC_API_KEY is not set"):
        run_job(store.path, job_id)


def test_a_local_author_takes_a_precision(
    store: Store, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--author local:MODEL@DTYPE``, as for a local judge: the job is created (the folder
    is checked without the suffix) and the model is loaded in that precision."""
    from pipeline import models
    from pipeline.author import _asker

    loads = []
    real = models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda spec, **kw: loads.append((spec, kw)) or real(spec, **kw)
    )
    params = AuthorParams(name="sly", description="d", author=f"local:{tiny_model_dir}@bfloat16")
    assert create_author_job(store, params)
    assert callable(_asker(params))
    assert loads == [(str(tiny_model_dir), {"dtype": "bfloat16"})]
