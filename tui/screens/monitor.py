"""Monitor: the token-by-token projection heatmap of a response (or of both answers of a
pair side by side), or of a live generation from a typed prompt, streamed as it is written.
Left/right change the layer, v the vector kind, z the normalisation; an optional steering
coefficient applies at the shown layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Input, Label, Static

from db import Store
from tui.screens.base import PersonaScreen
from tui.widgets.heatmap import heatmap, legend

KINDS = ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")


@dataclass
class ProjectionsLoaded(Message):
    """Per-token projections at every layer for one or two responses."""

    panels: list[dict[str, Any]]  # {"title", "tokens", "values" [T, L+1], "prompt_len"}
    layer: int


@dataclass
class TokensStreamed(Message):
    tokens: list[str]
    values: list[float]
    done: bool


class MonitorScreen(PersonaScreen):
    TITLE = "Monitor"
    AUTO_FOCUS = ".monitor-panel"  # not an input: number keys must still switch screens
    BINDINGS = [
        Binding("left", "layer(-1)", "Layer -"),
        Binding("right", "layer(1)", "Layer +"),
        Binding("v", "cycle_vector", "Vector"),
        Binding("z", "toggle_z", "z-score"),
        Binding("g", "focus_prompt", "Generate"),
        Binding("p", "show_pair", "Pair"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="monitor-controls"):
            yield Input(placeholder="type a prompt, enter to generate live", id="prompt")
            yield Label("coef")
            yield Input("0", id="coef", classes="number")
            yield Input(placeholder="response id", id="response", classes="number")
        yield Static("", id="monitor-info", markup=False)
        with Horizontal(id="monitor-panels"):
            with VerticalScroll(classes="monitor-panel"):
                yield Static("", id="panel-0", markup=False)
            with VerticalScroll(classes="monitor-panel"):
                yield Static("", id="panel-1", markup=False)
        yield Static("", id="monitor-legend", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.kind = KINDS[0]
        self.zscore = False
        self.shown_layer: int | None = None
        self.panels: list[dict[str, Any]] = []
        self.live: dict[str, Any] | None = None

    def on_screen_resume(self) -> None:
        self.action_show_pair()

    # ---- loading ---------------------------------------------------------------------------
    def action_show_pair(self) -> None:
        pair = getattr(self.app, "monitor_pair", None)
        trait = getattr(self.app, "trait", None)
        if pair and trait:
            self.load_responses(trait, list(pair))
        elif not trait:
            self.query_one("#monitor-info", Static).update(
                "no trait selected: press 1, pick a trait, press enter"
            )
        else:
            self.query_one("#monitor-info", Static).update(
                "open a pair on the Review screen and press m, type a response id, or a prompt"
            )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        trait = getattr(self.app, "trait", None)
        if not trait:
            return
        if event.input.id == "response" and event.value.strip().isdigit():
            self.load_responses(trait, [int(event.value)])
        elif event.input.id == "prompt" and event.value.strip():
            coef = self._coef()
            if coef is None:
                text = self.query_one("#coef", Input).value
                self.query_one("#monitor-info", Static).update(
                    Text(f"coef '{text}' is not a finite number; give e.g. 4 or -2", style="red")
                )
                return
            self.live = None
            self.generate_live(trait, event.value, coef, self.kind, self.shown_layer)

    def _coef(self) -> float | None:
        """The steering coefficient (blank: 0); None when it is not a finite number."""
        text = self.query_one("#coef", Input).value.strip()
        try:
            value = float(text or 0)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    @work(thread=True, exclusive=True, group="monitor-load", exit_on_error=False)
    def load_responses(self, trait: str, ids: list[int]) -> None:
        from pipeline.monitor import monitor_responses

        with Store(self.db_path) as store:
            layer, shown = monitor_responses(
                store, trait, ids, kind=self.kind, layer=self.shown_layer, zscored=self.zscore
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
        self.post_message(ProjectionsLoaded(panels, layer))

    @work(thread=True, exclusive=True, group="monitor-live", exit_on_error=False)
    def generate_live(
        self, trait: str, prompt: str, coef: float, kind: str, layer: int | None
    ) -> None:
        from pipeline.monitor import stream_answer

        def show(words: list[str], values: list[float]) -> None:
            self.post_message(TokensStreamed(words, values, False))

        with Store(self.db_path) as store:
            stream_answer(store, trait, prompt, show, kind=kind, layer=layer, coef=coef)
        self.post_message(TokensStreamed([], [], True))

    # ---- showing ---------------------------------------------------------------------------
    def on_projections_loaded(self, message: ProjectionsLoaded) -> None:
        self.panels = message.panels
        self.live = None
        self.shown_layer = message.layer
        self.render_panels()

    def on_tokens_streamed(self, message: TokensStreamed) -> None:
        if self.live is None:
            self.live = {"title": "live generation", "tokens": [], "values": []}
        tokens = message.tokens
        # Finished rows are padded; cut at the first end-of-turn token.
        stop = next(
            (i for i, t in enumerate(tokens) if t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")),
            None,
        )
        kept = tokens[:stop]
        self.live["tokens"] += kept
        self.live["values"] += message.values[: len(kept)]
        self.panels = []
        self.render_live(done=message.done)

    def render_live(self, done: bool) -> None:
        live = self.live or {"tokens": [], "values": []}
        scale = max((abs(v) for v in live["values"]), default=1.0) or 1.0
        state = "done" if done else "generating…"
        coef = self._coef()
        steer = f" · steering coef {coef:+g}" if coef else ""
        self.query_one("#monitor-info", Static).update(
            Text(f"live · {self.kind} · layer {self.shown_layer}{steer} · {state}", style="bold")
        )
        self.query_one("#panel-0", Static).update(
            heatmap(live["tokens"], live["values"], scale=scale)
        )
        self.query_one("#panel-1", Static).update("")
        self.query_one("#monitor-legend", Static).update(legend(scale, "h.v/|v|"))

    def render_panels(self) -> None:
        if not self.panels or self.shown_layer is None:
            return
        top = self.panels[0]["values"].shape[1] - 1
        self.shown_layer = min(max(self.shown_layer, 0), top)
        values = [p["values"][:, self.shown_layer] for p in self.panels]
        scale = (
            max(
                (
                    float(v[p["prompt_len"] :].abs().max())
                    for v, p in zip(values, self.panels, strict=True)
                    if v[p["prompt_len"] :].numel()
                ),
                default=1.0,
            )
            or 1.0
        )
        unit = "z-score" if self.zscore else "h.v/|v|"
        self.query_one("#monitor-info", Static).update(
            Text(f"{self.kind} · layer {self.shown_layer} of {top} · {unit}", style="bold")
        )
        for index in range(2):
            widget = self.query_one(f"#panel-{index}", Static)
            if index >= len(self.panels):
                widget.update("")
                continue
            panel = self.panels[index]
            body = Text(panel["title"] + "\n", style="bold")
            tail = values[index][panel["prompt_len"] :]
            mean = float(tail.mean()) if tail.numel() else 0.0
            body.append(f"response average {mean:+.3f}\n", style="dim")
            body.append_text(
                heatmap(
                    panel["tokens"], values[index].tolist(), scale=scale, start=panel["prompt_len"]
                )
            )
            widget.update(body)
        self.query_one("#monitor-legend", Static).update(legend(scale, unit))

    # ---- keys ------------------------------------------------------------------------------
    def action_layer(self, step: int) -> None:
        if self.shown_layer is None:
            return
        self.shown_layer += step
        self.render_panels()

    def action_cycle_vector(self) -> None:
        self.kind = KINDS[(KINDS.index(self.kind) + 1) % len(KINDS)]
        self.action_show_pair()

    def action_toggle_z(self) -> None:
        self.zscore = not self.zscore
        self.action_show_pair()

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()
