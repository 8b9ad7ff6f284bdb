from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import build_tiny_model

from db import Store
from pipeline.generate import GenerateParams, find_or_create_job
from pipeline.jobs import run_job


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (3 layers, hidden 64) with a ChatML template, built once."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_no_system_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model whose chat template rejects a system role."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-nosys"), system_role=False)


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "persona.db"


@pytest.fixture()
def store(db_path: Path) -> Store:
    with Store(db_path) as opened:
        yield opened


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Keep converted models in one cache per test session, never the user's."""
    import os

    shared = os.environ.get("PERSONA_TEST_CACHE")
    cache = Path(shared) if shared else tmp_path_factory.getbasetemp() / "persona-cache"
    monkeypatch.setenv("PERSONA_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _truecolor_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same terminal for every test, wherever it runs: a truecolor one with colour on
    (tests of 16 colours and NO_COLOR set their own)."""
    monkeypatch.setenv("COLORTERM", "truecolor")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("TEXTUAL_COLOR_SYSTEM", raising=False)


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A database with pos/neg generations on both splits (tiny model), judged by hand.
    Shared by many tests, some of which add to it."""
    return build_generated_db(tmp_path_factory.mktemp("extract") / "persona.db", tiny_model_dir)


def build_generated_db(db_path: Path, tiny_model_dir: Path) -> Path:
    """Pos/neg generations on both splits, judged by hand: pos rows score high on the
    trait, except on question 3; neg rows low; every row coherent."""
    with Store(db_path) as store:
        for split in ("extract", "eval"):
            for side in ("pos", "neg"):
                params = GenerateParams(
                    side=side,
                    split=split,
                    model=str(tiny_model_dir),
                    n_per_question=2,
                    max_new_tokens=6,
                    batch_size=8,
                )
                run_job(db_path, find_or_create_job(store, "paternalism", params))
        rows = []
        for r in store.responses():
            trait = 80.0 if r.side == "pos" else 10.0
            if r.side == "pos" and r.question == 3:
                trait = 30.0
            rows += [
                {"response": r.id, "metric": "trait", "judge": "hand", "score": trait},
                {"response": r.id, "metric": "coherence", "judge": "hand", "score": 90.0},
            ]
        store.add_judgments(rows)
    return db_path


@pytest.fixture(scope="module")
def extracted_db(generated: Path) -> Path:
    """The shared generated database with vectors extracted (the dashboard tests)."""
    from pipeline.extract import extract

    with Store(generated) as store:
        if not store.vectors(trait="paternalism"):
            extract(store, "paternalism")
    return generated


@pytest.fixture()
def review_db(extracted_db: Path, tmp_path: Path) -> Path:
    from tui_helpers import copy_db

    return copy_db(extracted_db, tmp_path / "review.db")
