"""Monitor: the token-by-token projection heatmap of a response (or of both answers of a
pair side by side), of a live generation from a typed prompt streamed as it is written, or of
the typed prompt answered twice, unsteered and steered, side by side (as ``persona steer``).

The layer (the trait's recommended one first) and the vector kind are chosen before anything
is shown: left/right change the layer, v the kind, z the normalisation. The coefficient and
the cap apply at the chosen layer to the next answer; an invalid one is shown as invalid and
not applied."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Header, Input, Label, Static
from textual.worker import Worker, WorkerState, get_current_worker

from db import Store
from pipeline.steer import SteeringSetting, WatchedAnswer
from tui.messages import (
    ComparisonLoaded,
    MonitorProgress,
    MonitorReady,
    MonitorUnavailable,
    ProjectionsLoaded,
    TokensStreamed,
)
from tui.screens.base import PersonaScreen
from tui.validators import SteeringValue, steering_problems, steering_setting
from tui.widgets.heatmap import legend
from tui.widgets.monitor_panels import MonitorPanels, answer_panel, shared_scale

KINDS = ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")
HINT = "open a pair on Review and press m, type a response id, or type a prompt (g)"
NO_TRAIT = "no trait selected: press 1, pick a trait, press enter"
LOADING = "the layers come with the trait's vectors: wait for them to load"
LAYER_KEYS = Binding.Group("Layer", compact=True)


class StreamReplaced(Exception):
    """Stops a live answer's decoding once a newer answer has replaced it."""


class MonitorScreen(PersonaScreen):
    TITLE = "Monitor"
    AUTO_FOCUS = ".monitor-panel"  # not an input: number keys must still switch screens
    BINDINGS = [
        # Priority: the focused scroll panel must not take the arrows the layer is chosen
        # with (while an input is focused they move its cursor: see check_action). One
        # footer entry for both, "←→ Layer": at 80 columns every key fits.
        Binding("left", "layer(-1)", "Layer -", priority=True, group=LAYER_KEYS),
        Binding("right", "layer(1)", "Layer +", priority=True, group=LAYER_KEYS),
        Binding("v", "cycle_vector", "Vector"),
        Binding("z", "toggle_z", "z-score"),
        Binding("g", "focus_prompt", "Prompt"),
        Binding("s", "compare", "Compare", tooltip="the prompt unsteered and steered"),
        Binding("p", "show_pair", "Pair"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="monitor-controls"):
            yield Input(placeholder="type a prompt, enter to generate live", id="prompt")
            yield Label("coef")
            yield Input("0", id="coef", classes="number", validators=[SteeringValue("coef")])
            yield Label("cap")
            yield Input(
                placeholder="none", id="cap", classes="number", validators=[SteeringValue("cap")]
            )
            yield Input(placeholder="id", id="response", classes="number")
        yield Static("", id="monitor-info", markup=False)
        yield MonitorPanels(id="monitor-panels")
        yield Static("", id="monitor-legend", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.kind = KINDS[0]
        self.kinds: list[str] = list(KINDS)
        self.zscore = False
        self.ready_trait: str | None = None  # whose layers and kinds are loaded
        self.chosen_layer: int | None = None
        self.top_layer: int | None = None
        self.mode = ""  # what the panels show: "pair", "answers" or nothing yet
        self.panels: list[dict[str, Any]] = []  # the pair, at every layer
        self.panels_z = False  # whether their values are z-scores
        # Typed-prompt answers (one live, or unsteered + steered), made at ``answered_at``.
        self.answers: list[WatchedAnswer] = []
        self.answered_at, self.answered_with = 0, ""  # their layer and steering
        self.run = 0  # the live generation whose tokens are shown
        self.live = ""  # "generating…", "done", or "" for a comparison
        self.notice = ""
        self.busy_worker: Worker | None = None

    def on_screen_resume(self) -> None:
        trait = getattr(self.app, "trait", None)
        if not trait:
            self.say(NO_TRAIT)
        elif trait != self.ready_trait:
            self.ready_trait = self.chosen_layer = self.top_layer = None
            self.mode = ""
            self.render_view()
            self.load_choices(trait)
        else:
            self.action_show_pair()

    # ---- workers: they post messages, never touch widgets -------------------------------------
    @work(thread=True, exclusive=True, group="monitor-ready", exit_on_error=False)
    def load_choices(self, trait: str) -> None:
        from pipeline.analyze import analyze

        with Store(self.db_path) as store:
            if not store.vectors(trait=trait, kind="response_avg_diff"):
                # A state, not an error: said in place (the screen is open while jobs run).
                self.post_message(MonitorUnavailable(f"'{trait}' has no vectors yet: press 4, x"))
                return
            report = analyze(store, trait)
        top = len(report.norms["response_avg_diff"]) - 1
        kinds = [kind for kind in KINDS if kind in report.records]
        self.post_message(MonitorReady(trait, report.default_layer, top, kinds))

    @work(thread=True, exclusive=True, group="monitor-load", exit_on_error=False)
    def load_responses(self, trait: str, ids: list[int], kind: str, layer: int, z: bool) -> None:
        from pipeline.monitor import monitor_responses

        def progress(text: str) -> None:
            self.post_message(MonitorProgress(text))

        with Store(self.db_path) as store:
            layer, shown = monitor_responses(
                store, trait, ids, kind=kind, layer=layer, zscored=z, on_progress=progress
            )
        panels = [
            {
                "title": f"{response.side} · response {response.id}",
                "tokens": proj.tokens,
                "values": proj.values[:, 0, :],
                "prompt_len": proj.prompt_len,
            }
            for response, proj in shown
        ]
        self.post_message(ProjectionsLoaded(panels, layer, z))

    @work(thread=True, exclusive=True, group="monitor-live", exit_on_error=False)
    def generate_live(
        self, run: int, trait: str, prompt: str, setting: SteeringSetting, kind: str, layer: int
    ) -> None:
        from pipeline.monitor import stream_answer

        worker = get_current_worker()

        def show(words: list[str], values: list[float]) -> None:
            if worker.is_cancelled:  # replaced by a newer answer: stop decoding this one
                raise StreamReplaced
            self.post_message(TokensStreamed(run, words, values, False))

        coef, cap = setting.coef, setting.cap
        with Store(self.db_path) as store:
            stream_answer(store, trait, prompt, show, kind=kind, layer=layer, coef=coef, cap=cap)
        self.post_message(TokensStreamed(run, [], [], True))

    @work(thread=True, exclusive=True, group="monitor-live", exit_on_error=False)
    def compare_answers(
        self, trait: str, prompt: str, setting: SteeringSetting, kind: str, layer: int
    ) -> None:
        from pipeline.steer import steered_and_unsteered

        with Store(self.db_path) as store:
            answers = steered_and_unsteered(store, trait, prompt, setting, layer=layer, kind=kind)
        self.post_message(ComparisonLoaded(answers))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        super().on_worker_state_changed(event)  # an error: the app's error dialog
        ended = event.state in (WorkerState.ERROR, WorkerState.CANCELLED)
        if ended and event.worker is self.busy_worker:
            self.set_busy(None)
        elif event.state == WorkerState.ERROR and event.worker.name == "generate_live":
            self.live = "failed"
            self.render_view()

    def set_busy(self, worker: Worker | None, text: str = "") -> None:
        """The panels' loading indicator and a line saying what runs (None: nothing)."""
        self.busy_worker = worker
        self.query_one(MonitorPanels).loading = worker is not None
        self.say(text)

    # ---- messages ------------------------------------------------------------------------------
    def on_monitor_ready(self, message: MonitorReady) -> None:
        if message.trait != getattr(self.app, "trait", None):
            return
        self.ready_trait, self.chosen_layer = message.trait, message.layer
        self.top_layer, self.kinds = message.top, message.kinds or list(KINDS)
        self.kind = self.kind if self.kind in self.kinds else self.kinds[0]
        self.action_show_pair()

    def on_monitor_unavailable(self, message: MonitorUnavailable) -> None:
        self.say(message.reason)

    def on_monitor_progress(self, message: MonitorProgress) -> None:
        if self.busy_worker is not None:
            self.say(message.text)

    def on_projections_loaded(self, message: ProjectionsLoaded) -> None:
        self.set_busy(None)
        self.mode, self.panels, self.panels_z = "pair", message.panels, message.zscored
        if self.chosen_layer is None:  # else the reader's choice, made while this loaded
            self.chosen_layer = message.layer
        self.render_view()

    def on_tokens_streamed(self, message: TokensStreamed) -> None:
        if self.mode != "answers" or message.run != self.run or not self.live:
            return
        self.answers[0].tokens.extend(message.tokens)
        self.answers[0].values.extend(message.values)
        self.live = "done" if message.done else self.live
        self.render_view(follow=True)

    def on_comparison_loaded(self, message: ComparisonLoaded) -> None:
        self.set_busy(None)
        self.mode, self.answers, self.live = "answers", message.answers, ""
        self.render_view()

    # ---- inputs --------------------------------------------------------------------------------
    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id in ("coef", "cap"):
            self.say(" · ".join(steering_problems(*self.steering_texts())))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        trait = getattr(self.app, "trait", None)
        if not trait:
            return
        if event.input.id != "response":
            if self.prompt():  # the prompt, the coef or the cap: answer again with them
                self.start_live(trait)
        elif not event.value.strip().isdigit():
            self.say(f"'{event.value}' is not a response id; give e.g. 12")
        elif self.chosen_layer is None:
            self.say(LOADING)
        else:
            self.show_responses(trait, [int(event.value)])

    def prompt(self) -> str:
        return self.query_one("#prompt", Input).value.strip()

    def steering_texts(self) -> tuple[str, str]:
        return self.query_one("#coef", Input).value, self.query_one("#cap", Input).value

    def steering(self) -> SteeringSetting | None:
        """The coef and cap inputs as a setting for the chosen layer; None (and a notice
        saying why) when one is invalid or the layer cannot be steered."""
        if problems := steering_problems(*self.steering_texts()):
            self.say(" · ".join(problems) + ": not applied")
            return None
        setting = steering_setting(*self.steering_texts())
        if self.chosen_layer is None:
            self.say(LOADING)
            return None
        if setting.active and self.chosen_layer < 1:
            self.say(f"steering needs a layer from 1 to {self.top_layer} (0 is the embeddings): →")
            return None
        return setting

    def start_live(self, trait: str) -> None:
        setting = self.steering()
        if setting is None or self.chosen_layer is None:
            return
        self.run += 1
        self.mode, self.live, self.notice = "answers", "generating…", ""
        self.answers = [WatchedAnswer("live answer", [], [], "")]
        self.answered_at, self.answered_with = self.chosen_layer, setting.label()
        self.query_one(".monitor-panel").focus()  # the screen's keys work at once
        self.render_view()
        self.generate_live(self.run, trait, self.prompt(), setting, self.kind, self.chosen_layer)

    def show_responses(self, trait: str, ids: list[int]) -> None:
        assert self.chosen_layer is not None
        what = "computing z-scores for" if self.zscore else "projecting"
        worker = self.load_responses(trait, ids, self.kind, self.chosen_layer, self.zscore)
        self.set_busy(worker, f"{what} response(s) {', '.join(map(str, ids))}…")

    # ---- keys ----------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "layer" and isinstance(self.focused, Input):
            return None  # shown, but the arrows move the cursor of the input being typed in
        return True

    def action_show_pair(self) -> None:
        pair = getattr(self.app, "monitor_pair", None)
        trait = getattr(self.app, "trait", None)
        if not trait:
            self.say(NO_TRAIT)
        elif self.ready_trait != trait:
            return  # the choices are loading; they show the pair when they arrive
        elif pair:
            self.show_responses(trait, list(pair))
        else:
            self.say(HINT)

    def action_layer(self, step: int) -> None:
        if self.chosen_layer is None or self.top_layer is None:
            self.say(LOADING)
            return
        self.chosen_layer = min(max(self.chosen_layer + step, 0), self.top_layer)
        self.render_view()

    def action_cycle_vector(self) -> None:
        self.kind = self.kinds[(self.kinds.index(self.kind) + 1) % len(self.kinds)]
        if self.mode == "pair":
            self.action_show_pair()
        else:
            self.say("the next answer uses this vector (enter answers again)")

    def action_toggle_z(self) -> None:
        self.zscore = not self.zscore
        if self.mode == "pair":
            self.action_show_pair()
        else:
            self.say("z-scores apply to stored responses: press p for the pair")

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_compare(self) -> None:
        trait = getattr(self.app, "trait", None)
        if not trait:
            return
        if not self.prompt():
            self.say("type a prompt first (g), then s answers it unsteered and steered")
            return
        setting = self.steering()
        if setting is None or self.chosen_layer is None:
            return
        if not setting.active:
            self.say("set a coef or a cap first: s compares that steering with none")
            return
        self.answered_at, self.answered_with = self.chosen_layer, setting.label()
        worker = self.compare_answers(trait, self.prompt(), setting, self.kind, self.chosen_layer)
        self.set_busy(worker, f"answering twice: unsteered, then {setting.label()}…")

    # ---- showing -------------------------------------------------------------------------------
    def say(self, notice: str) -> None:
        self.notice = notice
        self.query_one("#monitor-info", Static).update(self.info())

    def unit(self) -> str:
        return "z-score" if self.panels_z and self.mode == "pair" else "h.v/|v|"

    def info(self) -> Text:
        text = Text(style="bold")
        if self.chosen_layer is None or self.top_layer is None:
            if getattr(self.app, "trait", None) and self.ready_trait is None:
                text.append("loading the trait's layers and vectors…")
        else:
            text.append(f"{self.kind} · layer {self.chosen_layer} of {self.top_layer}")
            text.append(f" · {self.unit()}")
            if self.mode == "answers" and self.answered_at != self.chosen_layer:
                shown = f" · shown: layer {self.answered_at} (enter or s answers again)"
                text.append(shown, style="yellow")
            if self.mode == "answers" and self.live:
                text.append(f" · live · {self.answered_with} · {self.live}")
        if self.notice:
            text.append(("\n" if text.plain else "") + self.notice, style="yellow")
        return text

    def render_view(self, *, follow: bool = False) -> None:
        texts: list[Text] = []
        scale = 1.0
        if self.mode == "pair" and self.panels and self.chosen_layer is not None:
            values = [p["values"][:, self.chosen_layer].tolist() for p in self.panels]
            starts = [p["prompt_len"] for p in self.panels]
            scale = shared_scale(v[s:] for v, s in zip(values, starts, strict=True))
            texts = [
                answer_panel(p["title"], p["tokens"], v, scale=scale, start=p["prompt_len"])
                for v, p in zip(values, self.panels, strict=True)
            ]
        elif self.mode == "answers":
            scale = shared_scale(a.values for a in self.answers)
            for answer in self.answers:
                summary = f"response average {answer.average():+.3f}"
                summary += f" · {answer.finish_reason or self.live}"
                texts.append(
                    answer_panel(
                        answer.label, answer.tokens, answer.values, scale=scale, summary=summary
                    )
                )
        self.query_one(MonitorPanels).show(texts, follow=follow)
        key = legend(scale, self.unit()) if texts else Text("")
        if self.mode == "answers":  # the steering of the (last) answer shown
            key.append(f"\n{self.answered_with} at layer {self.answered_at}", style="bold")
        self.query_one("#monitor-legend", Static).update(key)
        self.query_one("#monitor-info", Static).update(self.info())
