"""``--deterministic``: the local engine's GPU decode attention on a kernel whose results
repeat run to run (``pipeline.runners.grouped_attention``). Its kernel runs on a GPU only
(tests/gpu: a rerun repeats, each family equals HF ``generate`` with it); here, on the CPU:
the flag travels from each command and the dashboard to the engine, changes no answer and
no job's identity, and the decode step's additive mask gives what the boolean one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_generate import pos_answers

from db import Store
from pipeline.runners import StaticRunner, grouped_attention
from tui.cli import main


@pytest.fixture()
def runners_made(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each engine's static runner's ``deterministic``, in the order they are made (an
    engine names it; a local judge's or extraction's runner, made for its fused forwards,
    does not)."""
    made: list[bool] = []
    real = StaticRunner.__init__

    def recording(self, model, **kwargs) -> None:
        real(self, model, **kwargs)
        if "deterministic" in kwargs:
            made.append(self.deterministic)

    monkeypatch.setattr(StaticRunner, "__init__", recording)
    return made


def test_generate_deterministic_reaches_the_engine_and_is_the_same_job(
    tmp_path: Path, tiny_model_dir: Path, runners_made: list[bool]
) -> None:
    """``generate --deterministic``: the engine's runner takes it; the answers equal the
    default run's (the CPU always repeats); and a rerun without the flag is the same job
    (it changes no output, as ``--compile`` does not), which finds nothing left to do."""
    db = tmp_path / "deterministic.db"
    plain = pos_answers(tmp_path / "plain.db", tiny_model_dir)
    assert runners_made == [False]
    assert pos_answers(db, tiny_model_dir, "--deterministic") == plain and len(plain) == 20
    assert runners_made == [False, True]
    runners_made.clear()
    assert pos_answers(db, tiny_model_dir) == plain  # the same job, found again
    with Store(db) as store:
        assert len(store.list_jobs()) == 1
    assert runners_made == []  # nothing left to generate: no engine made


def test_run_passes_deterministic_on(
    db_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run --deterministic`` plans its generation jobs with it."""
    import pipeline.run as run_module

    planned = []

    class Planned(Exception):
        pass

    def plan(store, trait, params):
        planned.append(params)
        raise Planned

    monkeypatch.setattr(run_module, "find_or_create_job", plan)
    command = ["--db", str(db_path), "run", "paternalism", "--model", str(tiny_model_dir)]
    command += ["--judge", f"local:{tiny_model_dir}", "--device", "cpu", "--deterministic"]
    with pytest.raises(Planned):
        main(command)
    assert planned and planned[0].deterministic is True


def test_a_deterministic_sweep_decodes_with_it_and_stores_the_plain_answers(
    extracted_db: Path, tiny_model_dir: Path, tmp_path: Path, runners_made: list[bool]
) -> None:
    """``sweep --deterministic``: the one engine of every setting takes it, and the steered answers
    are those of the plain sweep (the CPU repeats either way), which is the same job."""
    from test_use import _sweep_answers
    from tui_helpers import copy_db

    from pipeline.sweep import SweepParams

    plain = _sweep_answers(copy_db(extracted_db, tmp_path / "plain.db"), tiny_model_dir, (4.0,))
    assert runners_made and not any(runners_made)
    runners_made.clear()
    db = copy_db(extracted_db, tmp_path / "deterministic.db")
    assert _sweep_answers(db, tiny_model_dir, (4.0,), deterministic=True) == plain
    assert runners_made == [True]  # one engine for every setting, with it
    settings = dict(layers=(2,), coefs=(4.0,))
    assert SweepParams(**settings).deterministic is False  # opt-in
    assert (
        SweepParams(**settings, deterministic=True).identity() == SweepParams(**settings).identity()
    )


@pytest.mark.parametrize("softcap", [None, 50.0], ids=["sdpa", "soft-capped"])
def test_the_additive_decode_mask_equals_the_boolean_one(softcap: float | None) -> None:
    """A decode step's additive mask (0 or -inf, built once a step by
    ``StaticRunner.decode``) gives what the boolean mask does, through SDPA and through the
    soft-capped attention (Gemma-2's), whatever its dtype."""
    torch.manual_seed(0)
    batch, heads, kv, dim, keys = 3, 4, 2, 8, 10
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(batch, kv, keys, dim), torch.randn(batch, kv, keys, dim)
    allowed = torch.arange(keys)[None, :] < torch.tensor([3, 7, 10])[:, None]
    allowed = allowed[:, None, None, :]
    # In another dtype than the query's (the runner builds it in the embedding's): cast.
    additive = torch.full(allowed.shape, float("-inf"), dtype=torch.bfloat16)
    additive.masked_fill_(allowed, 0.0)
    with_bool, _ = grouped_attention(None, query, key, value, allowed, softcap=softcap)
    with_bias, _ = grouped_attention(None, query, key, value, additive, softcap=softcap)
    torch.testing.assert_close(with_bias, with_bool, rtol=0, atol=0)


def test_a_deterministic_runner_switches_in_the_repeatable_attention(tiny_model_dir: Path) -> None:
    """The layers find their attention by the name in the model's config: a deterministic
    runner's is registered with ``repeatable`` on, the default runner's without."""
    from transformers import AttentionInterface

    from pipeline.models import load_model
    from pipeline.runners import ATTENTION_NAME, REPEATABLE_ATTENTION_NAME

    model = load_model(str(tiny_model_dir)).model
    functions = AttentionInterface()
    for deterministic, name in ((False, ATTENTION_NAME), (True, REPEATABLE_ATTENTION_NAME)):
        runner = StaticRunner(model, deterministic=deterministic)
        with runner.attention():
            assert model.config._attn_implementation == name
        attention = functions[name]
        assert getattr(attention, "keywords", {}).get("repeatable", False) is deterministic


def test_overlapping_runners_never_lose_the_repeatable_attention(tiny_model_dir: Path) -> None:
    """Two runners on one model may overlap (the dashboard's monitor): whichever enters
    first, a deterministic one keeps the repeatable attention while it runs, and the model
    gets its own attention back when the last one leaves."""
    from pipeline.models import load_model
    from pipeline.runners import ATTENTION_NAME, REPEATABLE_ATTENTION_NAME

    model = load_model(str(tiny_model_dir)).model
    before = model.config._attn_implementation
    default, repeatable = StaticRunner(model), StaticRunner(model, deterministic=True)
    for first, second in ((default, repeatable), (repeatable, default)):
        with first.attention():
            expected = ATTENTION_NAME if first is default else REPEATABLE_ATTENTION_NAME
            assert model.config._attn_implementation == expected
            with second.attention():
                assert model.config._attn_implementation == REPEATABLE_ATTENTION_NAME
        assert model.config._attn_implementation == before
