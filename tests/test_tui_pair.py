"""The pair view: both answers with length and finish reason, the judge's evidence as bars,
the prompts, a heatmap one key away, overrides that keep the review's place, and judging
the pair again (the judge and its cost first; errors in the app's one error modal)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from textual.widgets import DataTable
from tui_helpers import text_of, wait_for

from db import Store
from db.store import Judgment
from pipeline.pair_view import evidence_of
from tui.app import PersonaApp
from tui.screens.confirm import ConfirmModal
from tui.screens.error import ErrorModal
from tui.screens.pair_detail import PairDetail, evidence_bars


async def open_first_pair(app: PersonaApp, pilot) -> None:
    """Review (3), the table focused, enter on the first pair, until its answers show."""
    await pilot.press("3")
    await wait_for(pilot, lambda: "effective of" in text_of(app, "#review-counts"))
    app.screen.query_one("#pairs-table", DataTable).focus()
    await pilot.press("enter")
    await wait_for(pilot, lambda: "POS" in text_of(app, "#pair-pos"))


def _judgment(evidence: dict, score: float | None = 42.0) -> Judgment:
    return Judgment(1, 1, "trait", "j", score, evidence, None, 0, 0.0, "")


def test_evidence_reads_the_same_for_every_judge() -> None:
    openai = evidence_of(
        _judgment({"top_logprobs": [["7", math.log(0.2)], ["80", math.log(0.7)], ["hm", -3.0]]})
    )
    assert [t for t, _ in openai.top] == ["80", "7", "hm"]  # likeliest first
    assert openai.top[0][1] == pytest.approx(0.7)
    assert openai.number_mass == pytest.approx(0.9)
    local = evidence_of(_judgment({"top": [["3", 0.169402], ["100", 0.086548]], "refusal": 0.25}))
    assert local.top[0] == ("3", 0.169402) and local.number_mass == pytest.approx(0.75)
    text = evidence_of(_judgment({"answers": ["85", "REFUSAL"]}))
    assert text.number_mass is None and text.answers == ["85", "REFUSAL"]


def test_evidence_bars_are_spans_sized_by_probability() -> None:
    evidence = evidence_of(_judgment({"top": [["[bold]", 0.5], ["90", 0.25]]}, score=None))
    bars = evidence_bars(evidence, width=16)
    lines = bars.plain.splitlines()
    assert lines[0].startswith("trait no score")
    assert "'[bold]' ████████········ 0.50" in lines[1]  # the token as text, not markup
    assert lines[2].count("█") == 4
    assert "25% on numbers" in lines[0]


async def test_pair_view_at_80x24_and_overrides_keep_the_place(review_db: Path) -> None:
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("3")
        await wait_for(pilot, lambda: "effective of" in text_of(app, "#review-counts"))
        table = app.screen.query_one("#pairs-table", DataTable)
        table.focus()
        await pilot.press("down", "down")
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PairDetail))
        await wait_for(pilot, lambda: "POS" in text_of(app, "#pair-pos"))
        pair = app.screen
        assert pair.query_one("#pair-sides").has_class("stacked")  # one above the other
        with Store(review_db) as store:
            pos = store.get_response(pair.row["pos_id"])
        pos_text = text_of(app, "#pair-pos")
        assert f"{len(pos.answer_ids)} tokens" in pos_text
        assert "cut off at the token limit" in pos_text or "finished" in pos_text
        assert pos.answer in pos_text and "on numbers" not in pos_text  # hand scores: no bars
        context = text_of(app, "#pair-context")
        assert pos.system_prompt in context and pos.question_text in context
        assert f"pos system prompt (instruction {pos.instruction})" in context
        await pilot.press("x")
        await wait_for(pilot, lambda: "override: excluded" in text_of(app, "#pair-title"))
        await pilot.press("escape")
        await wait_for(pilot, lambda: "excluded by hand 1" in text_of(app, "#review-counts"))
        await pilot.pause(0.3)
        assert table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == key


async def test_heatmap_is_one_key_away_and_follows_the_layer(review_db: Path) -> None:
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(120, 40)) as pilot:
        await open_first_pair(app, pilot)
        assert not app.screen.query_one("#pair-sides").has_class("stacked")
        answer = text_of(app, "#pair-pos")
        await pilot.press("h")
        await wait_for(pilot, lambda: "layer 3 of 3" in text_of(app, "#pair-pos"), timeout=60)
        assert "response average" in text_of(app, "#pair-neg")
        await pilot.press("left")
        assert "layer 2 of 3" in text_of(app, "#pair-pos")
        await pilot.press("h")
        assert text_of(app, "#pair-pos") == answer


async def test_judging_a_pair_again_names_the_judge_and_cost(
    review_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import job_processes
    from pipeline.judging import JudgeParams

    started: list[int] = []
    monkeypatch.setattr(job_processes, "start_worker", lambda store, job_id: started.append(job_id))
    with Store(review_db) as store:
        # The pairs carry an API judge's scores, made by a job with a local server.
        params = JudgeParams(judge="openai:gpt-4.1-mini", base_url="http://127.0.0.1:9/v1")
        store.create_job("judge", "paternalism", params.to_dict())
        store.add_judgments(
            {"response": r.id, "metric": m, "judge": "openai:gpt-4.1-mini", "score": 50.0}
            for r in store.responses()
            for m in ("trait", "coherence")
        )
        store.db["judgments"].delete_where("judge = 'hand'")
        before = store.db["judgments"].count
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(100, 30)) as pilot:
        await open_first_pair(app, pilot)
        row = app.screen.row
        await pilot.press("j")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        message = app.screen.message
        assert "openai:gpt-4.1-mini will be asked 4 times" in message
        assert "about $0.00" in message
        await pilot.press("y")
        await wait_for(pilot, lambda: bool(started))
    with Store(review_db) as store:
        job = store.get_job(started[0])
        assert tuple(job.params["responses"]) == (row["pos_id"], row["neg_id"])
        assert job.params["base_url"] == "http://127.0.0.1:9/v1"
        assert store.db["judgments"].count == before  # nothing deleted before new ones exist


async def test_pair_view_errors_reach_the_error_modal(review_db: Path) -> None:
    """The fixture's scores are by 'hand': asking that judge again is refused, in the app's
    error modal (a modal's workers take the same path as every screen's)."""
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(100, 30)) as pilot:
        await open_first_pair(app, pilot)
        await pilot.press("j")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert app.screen.title_text == "Judge again failed"
        assert "the scores are by 'hand', which cannot be asked again" in app.screen.message
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, PairDetail))
