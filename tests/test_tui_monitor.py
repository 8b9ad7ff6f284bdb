"""The Monitor screen driven by keys: the layer and vector chosen before any pair, validated
coefficient and cap inputs, a live answer that is capped and followed as it streams, the
prompt answered unsteered and steered side by side, and z-scores computed in a worker."""

from __future__ import annotations

import threading
from pathlib import Path
from statistics import median

import pytest
from textual.containers import VerticalScroll
from textual.widgets import Input
from tui_helpers import text_of, wait_for

from db import Store
from tui.app import PersonaApp
from tui.messages import TokensStreamed
from tui.validators import SteeringValue

TRAIT = "paternalism"


def _pair(db: Path) -> tuple[int, int]:
    with Store(db) as store:
        pos = store.responses(side="pos", split="extract")[0]
        neg = next(r for r in store.responses(side="neg") if r.key == pos.key)
    return pos.id, neg.id


def _default_layer(db: Path) -> int:
    from pipeline.analyze import analyze

    with Store(db) as store:
        return analyze(store, TRAIT).default_layer


def info(app: PersonaApp) -> str:
    return text_of(app, "#monitor-info")


async def _ready(app: PersonaApp, pilot) -> None:
    await pilot.press("5")
    await wait_for(pilot, lambda: " of 3" in info(app))


async def _answer(app: PersonaApp, pilot, prompt: str, **inputs: str) -> None:
    """Type the inputs and the prompt, press enter, wait for the live answer to end."""
    for name, value in inputs.items():
        app.screen.query_one(f"#{name}", Input).value = value
    box = app.screen.query_one("#prompt", Input)
    box.value = prompt
    box.focus()
    await pilot.press("enter")
    await wait_for(pilot, lambda: "· done" in info(app), timeout=60)


def test_steering_inputs_accept_exactly_what_the_setting_accepts() -> None:
    coef, cap = SteeringValue("coef"), SteeringValue("cap")
    for good in ("0", "6", "-2.5", " 4 ", "1e4"):
        assert coef.validate(good).is_valid, good
    for bad in ("", " ", "nan", "inf", "-inf", "abc", "1e999", "2e4"):
        assert not coef.validate(bad).is_valid, bad
    for good in ("", "3.5", "-1", "0"):
        assert cap.validate(good).is_valid, good
    for bad in ("nan", "inf", "abc", "1e999"):
        assert not cap.validate(bad).is_valid, bad


async def test_monitor_shows_a_pair_and_changes_layer(review_db: Path) -> None:
    pos, neg = _pair(review_db)
    app = PersonaApp(review_db, trait=TRAIT)
    app.monitor_pair = (pos, neg)
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("5")
        # The recommended layer comes first (layer 3 separates best on this data).
        await wait_for(pilot, lambda: f"response {pos}" in text_of(app, "#panel-0"))
        assert "layer 3 of 3" in info(app)
        assert f"response {neg}" in text_of(app, "#panel-1")
        before = text_of(app, "#panel-0")
        await pilot.press("left")
        assert "layer 2 of 3" in info(app)
        assert text_of(app, "#panel-0") != before
        await pilot.press("left", "left", "left")
        assert "layer 0 of 3" in info(app)
        await pilot.press("right")
        assert "layer 1 of 3" in info(app)


async def test_monitor_chooses_layer_and_vector_before_any_pair(review_db: Path) -> None:
    default = _default_layer(review_db)
    app = PersonaApp(review_db, trait=TRAIT)  # no pair opened
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(app, pilot)
        assert f"response_avg_diff · layer {default} of 3" in info(app)
        assert "None" not in info(app) and "open a pair on Review" in info(app)
        # The focused panel scrolls, yet the arrows reach the screen (priority bindings)...
        assert isinstance(app.focused, VerticalScroll)
        await pilot.press("left")
        assert f"layer {default - 1} of 3" in info(app)
        await pilot.press("v")
        assert f"prompt_avg_diff · layer {default - 1} of 3" in info(app)
        # ...and are in the footer, as one "←→ Layer".
        assert app.active_bindings["left"].binding.priority
        assert "Layer" in [str(label.render()) for label in app.screen.query("FooterLabel")]
        # While the prompt is typed in, they move its cursor instead.
        box = app.screen.query_one("#prompt", Input)
        box.focus()
        box.value = "Plan"
        await pilot.pause(0.1)
        box.cursor_position = 4
        await pilot.press("left")
        assert box.cursor_position == 3 and f"layer {default - 1} of 3" in info(app)


async def test_monitor_streams_a_live_generation(review_db: Path) -> None:
    app = PersonaApp(review_db, trait=TRAIT)
    async with app.run_test(size=(120, 32)) as pilot:
        await _ready(app, pilot)
        await _answer(app, pilot, "Plan my [week]")
        assert "live answer" in text_of(app, "#panel-0")
        assert len(app.screen.answers[0].tokens) > 1
        assert "unsteered at layer 3" in text_of(app, "#monitor-legend")
        assert not app.screen.query_one("#second-panel").display  # one answer, one panel


async def test_monitor_shows_bad_steering_values_as_invalid_and_applies_none(
    review_db: Path,
) -> None:
    app = PersonaApp(review_db, trait=TRAIT)
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(app, pilot)
        box = app.screen.query_one("#prompt", Input)
        box.value = "Plan my week"
        for field, bad in [("coef", "nan"), ("coef", "abc"), ("coef", "inf"), ("coef", "")]:
            app.screen.query_one(f"#{field}", Input).value = bad
            await pilot.pause(0.1)
            assert app.screen.query_one(f"#{field}", Input).has_class("-invalid")
            assert f"{field} '{bad}' is not a finite number" in info(app)
            box.focus()
            await pilot.press("enter")
            assert "not applied" in info(app) and app.screen.mode == ""  # nothing generated
        app.screen.query_one("#coef", Input).value = "0"
        for bad in ("abc", "inf", "nan"):
            app.screen.query_one("#cap", Input).value = bad
            await pilot.pause(0.1)
            assert app.screen.query_one("#cap", Input).has_class("-invalid")
            assert f"cap '{bad}' is not a finite projection value" in info(app)
            app.screen.query_one(".monitor-panel").focus()
            await pilot.press("s")  # the compare key refuses it too
            assert "not applied" in info(app) and app.screen.mode == ""
        app.screen.query_one("#cap", Input).value = ""
        await pilot.pause(0.1)
        assert "is not" not in info(app)  # valid again: the notice goes
        await pilot.press("left", "left", "left")  # layer 0 cannot be steered
        app.screen.query_one("#coef", Input).value = "4"
        box.focus()
        await pilot.press("enter")
        assert "steering needs a layer from 1 to 3" in info(app) and app.screen.mode == ""


async def test_monitor_caps_the_live_answer(review_db: Path) -> None:
    app = PersonaApp(review_db, trait=TRAIT)
    async with app.run_test(size=(120, 32)) as pilot:
        await _ready(app, pilot)
        await _answer(app, pilot, "Plan my week")
        plain = list(app.screen.answers[0].values)
        tau = f"{median(plain):.5f}"
        assert max(plain) > float(tau)
        app.screen.query_one("#cap", Input).value = tau
        app.screen.query_one("#cap", Input).focus()
        await pilot.press("enter")  # enter in the cap answers the prompt again, capped
        await wait_for(pilot, lambda: f"live · capped at {float(tau):g} · done" in info(app), 60)
        assert max(app.screen.answers[0].values) <= float(tau) + 1e-5
        assert f"capped at {float(tau):g} at layer 3" in text_of(app, "#monitor-legend")


async def test_monitor_live_text_follows_the_stream(review_db: Path) -> None:
    app = PersonaApp(review_db, trait=TRAIT)
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(app, pilot)
        await _answer(app, pilot, "Hi")
        screen = app.screen
        panel = screen.query(".monitor-panel").first(VerticalScroll)

        async def stream(n: int) -> None:
            screen.post_message(TokensStreamed(screen.run, ["word\n"] * n, [0.1] * n, False))
            await pilot.pause(0.3)

        await stream(40)
        assert panel.max_scroll_y > 0 and panel.scroll_y == panel.max_scroll_y
        panel.scroll_home(animate=False)  # the reader scrolls up: new tokens leave it there
        await pilot.pause(0.1)
        await stream(5)
        assert panel.scroll_y == 0
        panel.scroll_end(animate=False)  # back at the end: it follows again
        await pilot.pause(0.1)
        await stream(5)
        assert panel.scroll_y == panel.max_scroll_y > 0
        # A replaced generation's late tokens are dropped.
        before = len(screen.answers[0].tokens)
        screen.post_message(TokensStreamed(screen.run - 1, ["late"], [0.0], False))
        await pilot.pause(0.2)
        assert len(screen.answers[0].tokens) == before


async def test_monitor_compares_steered_and_unsteered(review_db: Path) -> None:
    app = PersonaApp(review_db, trait=TRAIT)
    async with app.run_test(size=(120, 32)) as pilot:
        await _ready(app, pilot)
        await _answer(app, pilot, "Plan my week", coef="0")
        unsteered = list(app.screen.answers[0].tokens)
        await pilot.press("s")
        assert "set a coef or a cap first" in info(app)
        app.screen.query_one("#coef", Input).value = "6"
        await pilot.press("s")
        await wait_for(pilot, lambda: "steering coef +6" in text_of(app, "#panel-1"), timeout=60)
        answers = app.screen.answers
        assert [a.label for a in answers] == ["unsteered", "steering coef +6 at layer 3"]
        assert answers[0].tokens == unsteered  # the same prompt and seed as the live answer
        assert answers[1].tokens != unsteered
        assert text_of(app, "#panel-0").startswith("unsteered")
        assert "steering coef +6 at layer 3" in text_of(app, "#monitor-legend")
        panels = app.screen.query_one("#monitor-panels")
        assert not panels.has_class("stacked")
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.2)
        assert panels.has_class("stacked")  # one above the other below 100 columns
        await pilot.press("left")  # a new layer: said to apply to the next answers
        assert "shown: layer 3" in info(app)


async def test_monitor_zscores_in_a_worker_with_progress(
    review_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.monitor

    release = threading.Event()
    real = pipeline.monitor.baseline_stats

    def slow_baseline(*args, **kwargs):
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.monitor, "baseline_stats", slow_baseline)
    app = PersonaApp(review_db, trait=TRAIT)
    app.monitor_pair = _pair(review_db)
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("5")
        await wait_for(pilot, lambda: "response" in text_of(app, "#panel-0"))
        panels = app.screen.query_one("#monitor-panels")
        await pilot.press("z")
        assert panels.loading  # then the stages, in words
        await wait_for(pilot, lambda: "neutral baseline" in info(app))
        assert "h.v/|v|" in info(app)  # the shown values are not z-scores yet
        await pilot.press("left")  # the screen answers while the baseline is computed
        assert "layer 2 of 3" in info(app)
        release.set()
        await wait_for(pilot, lambda: not panels.loading, timeout=60)
        assert "layer 2 of 3 · z-score" in info(app)  # the reader's layer is kept
        assert text_of(app, "#monitor-legend").startswith("z-score")


async def test_monitor_worker_errors_go_to_the_error_dialog(
    review_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.monitor
    from db import PersonaError
    from tui.screens.error import ErrorModal

    def broken(*_args, **_kwargs):
        raise PersonaError("the model is gone")

    monkeypatch.setattr(pipeline.monitor, "stream_answer", broken)
    app = PersonaApp(review_db, trait=TRAIT)
    async with app.run_test(size=(80, 24)) as pilot:
        await _ready(app, pilot)
        monitor = app.screen
        box = monitor.query_one("#prompt", Input)
        box.value = "Plan my week"
        box.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert app.screen.message == "the model is gone"
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is monitor)
        assert "live · unsteered · failed" in info(app)
