from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import build_tiny_model

from db import Store


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
