"""The pair view, made for judging the judge: both answers first (side by side, stacked on a
narrow terminal) with their length and finish reason, each judgment's score with a bar chart
of the judge's likeliest answer tokens and the probability on numbers, then the question and
the exact system prompts. ``h`` shows each answer as a token heatmap at a layer (left/right
change it); i/x/u set the pair's override; ``j`` judges this pair again, after saying which
judge and what it should cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static
from textual.worker import Worker, WorkerState

from db import Store
from pipeline.pair_view import AnswerProjections, Evidence, PairView
from tui.screens.base import PersonaModal
from tui.screens.confirm import ConfirmModal
from tui.widgets.heatmap import heatmap, legend

STACK_BELOW = 100  # columns: narrower terminals show the two answers one above the other
BAR_WIDTH = 16
BAR_ROWS = 5  # the judge's likeliest tokens shown per judgment
FINISH = {"eos": "finished", "length": "cut off at the token limit"}


@dataclass
class PairLoaded(Message):
    view: PairView


@dataclass
class ProjectionsReady(Message):
    projections: AnswerProjections


@dataclass
class RejudgePlanned(Message):
    params: Any  # JudgeParams
    requests: int
    cost: float | None


def evidence_bars(evidence: Evidence, width: int = BAR_WIDTH, rows: int = BAR_ROWS) -> Text:
    """A judgment as its score, the probability on numbers and a bar per likely token, built
    from spans (a token may hold "[" or control text)."""
    text = Text()
    score = "no score" if evidence.score is None else f"{evidence.score:.1f}"
    text.append(f"{evidence.metric} {score}", style="bold")
    if evidence.number_mass is not None:
        text.append(f"  ·  {evidence.number_mass:.0%} on numbers", style="dim")
    if evidence.error:
        text.append(f"\n  failed: {evidence.error}", style="red")
    shown = evidence.top[:rows]
    label_width = max((len(repr(t)) for t, _ in shown), default=0)
    for token, p in shown:
        filled = round(p * width)
        text.append("\n  ")
        text.append(repr(token).rjust(label_width), style="bold")
        text.append(" ")
        text.append("█" * filled, style="cyan")
        text.append("·" * (width - filled), style="dim")
        text.append(f" {p:.2f}")
    for answer in evidence.answers:
        text.append("\n  answered ")
        text.append(repr(answer), style="bold")
    return text


def side_text(side: str, view: PairView, heat: Text | None = None) -> Text:
    """One side: its header (length, finish reason), scores, the answer (or its heatmap) and
    the judge's evidence."""
    response = getattr(view, side)
    evidence = view.evidence.get(side, [])
    text = Text(f"{side.upper()} · response {response.id}", style="bold")
    finish = FINISH.get(response.finish_reason, response.finish_reason)
    cut = response.finish_reason == "length"
    text.append(
        f"\n{len(response.answer_ids)} tokens · {finish}", style="bold red" if cut else "dim"
    )
    if evidence:
        text.append("\n" + " · ".join(_score_line(e) for e in evidence), style="bold")
    text.append("\n\n")
    if heat is not None:
        text.append_text(heat)
    else:
        text.append(response.answer)
    for e in evidence:
        text.append("\n\n")
        text.append_text(evidence_bars(e))
    if not evidence:
        text.append(f"\n\nnot judged by {view.judge}", style="dim")
    return text


def _score_line(evidence: Evidence) -> str:
    score = "-" if evidence.score is None else f"{evidence.score:.0f}"
    return f"{evidence.metric} {score}"


def context_text(view: PairView) -> Text:
    """The question, and the exact prompts each side was given (an imported row: the
    rendered prompt)."""
    text = Text("question\n", style="bold")
    text.append(view.pos.question_text)
    for side in ("pos", "neg"):
        response = getattr(view, side)
        text.append(f"\n\n{side} system prompt (instruction {response.instruction})\n", "bold")
        text.append(response.system_prompt or response.prompt_text or "(none)")
    return text


class PairDetail(PersonaModal[None]):
    """One pair; its workers' errors end in the app's error modal like every screen's."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("i", "include", "Include"),
        Binding("x", "exclude", "Exclude"),
        Binding("u", "clear", "Clear"),
        Binding("j", "rejudge", "Judge again"),
        Binding("h", "toggle_heatmap", "Heatmap"),
        # Priority: the scrolling body must not take the arrows the layer is chosen with.
        Binding("left", "layer(-1)", "Layer -", priority=True),
        Binding("right", "layer(1)", "Layer +", priority=True),
        Binding("m", "monitor", "Monitor"),
    ]
    KEYS = "i include · x exclude · u clear · j judge again · h heatmap · ←/→ layer · m monitor"

    def __init__(self, row: dict[str, Any], source: dict[str, Any]) -> None:
        super().__init__()
        self.row = row
        self.source = source
        self.view: PairView | None = None
        self.projections: AnswerProjections | None = None
        self.show_heat = False
        self.shown_layer: int | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="pair-box"):
            yield Static(self.title_text(), id="pair-title")
            with VerticalScroll(id="pair-body"):
                with Horizontal(id="pair-sides"):
                    yield Static("loading…", id="pair-pos", classes="pair-side", markup=False)
                    yield Static("", id="pair-neg", classes="pair-side", markup=False)
                yield Static("", id="pair-context", markup=False)
            yield Static(Text(f"{self.KEYS} · esc close", style="dim"), id="pair-keys")

    def on_mount(self) -> None:
        self.query_one("#pair-body").focus()
        self.load()

    def on_resize(self) -> None:
        self.query_one("#pair-sides").set_class(self.size.width < STACK_BELOW, "stacked")

    def title_text(self) -> Text:
        row = self.row
        text = Text(
            f"pair q{row['question']} i{row['instruction']} s{row['sample']} · {row['reason']}",
            style="bold",
        )
        override = self.view.override if self.view else None
        if override is not None:
            text.append(f" · override: {'included' if override else 'excluded'}", "bold yellow")
        text.append(f" · judge {self.source['judge']}", style="dim")
        return text

    # ---- loading ---------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="pair-load", exit_on_error=False, name="Load pair")
    def load(self) -> None:
        from pipeline.pair_view import load_pair

        with Store(self.db_path) as store:
            view = load_pair(
                store, self.source["trait"], self.row["pos_id"], self.row["neg_id"],
                self.source["judge"],
            )  # fmt: skip
        self.post_message(PairLoaded(view))

    def on_pair_loaded(self, message: PairLoaded) -> None:
        self.view = message.view
        self.refresh_view()

    def refresh_view(self) -> None:
        if self.view is None:
            return
        self.query_one("#pair-title", Static).update(self.title_text())
        heat = self.heatmaps() if self.show_heat else {}
        for side in ("pos", "neg"):
            self.query_one(f"#pair-{side}", Static).update(
                side_text(side, self.view, heat.get(side))
            )
        self.query_one("#pair-context", Static).update(context_text(self.view))

    def heatmaps(self) -> dict[str, Text]:
        if self.projections is None or self.shown_layer is None:
            note = Text("projecting the answers on the trait's vector…", style="italic")
            return {"pos": note, "neg": note}
        proj = self.projections
        values = [v[:, self.shown_layer] for v in proj.values]
        scale = max((float(v.abs().max()) for v in values if v.numel()), default=1.0) or 1.0
        out = {}
        for side, tokens, shown in zip(("pos", "neg"), proj.tokens, values, strict=True):
            text = Text(f"{proj.kind} · layer {self.shown_layer} of {proj.num_layers}\n", "italic")
            text.append_text(legend(scale, "h.v/|v|", steps=5))
            text.append(f"\nresponse average {float(shown.mean()) if shown.numel() else 0:+.3f}\n")
            text.append_text(heatmap(tokens, shown.tolist(), scale=scale))
            out[side] = text
        return out

    def action_toggle_heatmap(self) -> None:
        self.show_heat = not self.show_heat
        if self.show_heat and self.projections is None:
            self.project()
        self.refresh_view()

    @work(thread=True, exclusive=True, group="pair-project", exit_on_error=False, name="Heatmap")
    def project(self) -> None:
        from pipeline.pair_view import answer_projections

        with Store(self.db_path) as store:
            ids = [self.row["pos_id"], self.row["neg_id"]]
            self.post_message(
                ProjectionsReady(answer_projections(store, self.source["trait"], ids))
            )

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        super().on_worker_state_changed(event)  # the error modal says what failed
        if event.worker.group == "pair-project" and event.state == WorkerState.ERROR:
            self.show_heat = False
            self.refresh_view()

    def on_projections_ready(self, message: ProjectionsReady) -> None:
        self.projections = message.projections
        if self.shown_layer is None:
            self.shown_layer = message.projections.layer
        self.refresh_view()

    def action_layer(self, step: int) -> None:
        if self.projections is None or self.shown_layer is None:
            self.notify("press h first: the layer is the heatmap's", timeout=3)
            return
        self.shown_layer = min(max(self.shown_layer + step, 0), self.projections.num_layers)
        self.refresh_view()

    # ---- overrides -------------------------------------------------------------------------
    def action_include(self) -> None:
        self.write_override(True)

    def action_exclude(self) -> None:
        self.write_override(False)

    def action_clear(self) -> None:
        self.write_override(None)

    @work(thread=True, group="pair-override", exit_on_error=False, name="Set the override")
    def write_override(self, include: bool | None) -> None:
        key = (self.row["question"], self.row["instruction"], self.row["sample"])
        with Store(self.db_path) as store:
            store.set_override(self.source["trait"], key, include, note="set in the pair view")
        label = {True: "included", False: "excluded", None: "override cleared"}[include]
        self.app.call_from_thread(self.notify, f"pair {key}: {label}")
        self.load()

    # ---- judging again ---------------------------------------------------------------------
    @work(thread=True, group="pair-judge", exit_on_error=False, name="Judge again")
    def action_rejudge(self) -> None:
        from pipeline.judging import estimate_judging, rejudge_params

        ids = [self.row["pos_id"], self.row["neg_id"]]
        with Store(self.db_path) as store:
            params = rejudge_params(store, self.source["trait"], self.source["judge"], ids)
            estimate = estimate_judging(store, self.source["trait"], params)
        self.post_message(RejudgePlanned(params, estimate.requests, estimate.cost))

    def on_rejudge_planned(self, message: RejudgePlanned) -> None:
        params = message.params
        if params.judge.startswith("local:"):
            self.start_rejudge(params)  # costs nothing but time: no question asked
            return
        cost = "no price known" if message.cost is None else f"about ${message.cost:.4f}"
        text = (
            f"{params.spec} will be asked {message.requests} times (trait and coherence of "
            f"both answers): {cost}. The present scores stay until the new ones arrive."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.start_rejudge(params)

        self.app.push_screen(ConfirmModal("Judge this pair again?", text), answered)

    @work(thread=True, group="pair-judge", exit_on_error=False, name="Judge again")
    def start_rejudge(self, params: Any) -> None:
        from pipeline import job_processes
        from pipeline.judging import find_or_create_judge_job

        with Store(self.db_path) as store:
            job_id = find_or_create_judge_job(store, self.source["trait"], params)
            job_processes.start_worker(store, job_id)
        self.app.call_from_thread(
            self.notify, f"judging this pair again in job {job_id} (screen 2)", timeout=6
        )

    def action_monitor(self) -> None:
        self.app.monitor_pair = (self.row["pos_id"], self.row["neg_id"])  # type: ignore[attr-defined]
        self.dismiss(None)
        self.app.switch_mode("monitor")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
