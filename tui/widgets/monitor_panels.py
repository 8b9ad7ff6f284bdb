"""The Monitor screen's two answer panels: side by side, one above the other below
``STACK_BELOW`` columns, the second hidden when one answer is shown; a loading indicator over
both while a worker computes; and a first panel that follows a stream's newest tokens.

``answer_panel`` is one answer as they show it (a title, a summary line, the heatmap) and
``shared_scale`` the one colour scale of answers shown together (equal colours, equal
projections)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Static

from tui.screens.pair_detail import STACK_BELOW
from tui.widgets.heatmap import heatmap


def shared_scale(answers: Iterable[Sequence[float]]) -> float:
    """The largest |projection| over the answers' tokens (1 when there is none)."""
    return max((abs(v) for values in answers for v in values), default=1.0) or 1.0


def answer_panel(
    title: str,
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    scale: float,
    start: int = 0,
    summary: str = "",
) -> Text:
    """The answer's tokens from ``start`` (before it: the prompt) under its title; the
    summary line defaults to the average projection of those tokens."""
    shown = list(values[start:])
    if not summary:
        mean = sum(shown) / len(shown) if shown else 0.0
        summary = f"response average {mean:+.3f}"
    body = Text(title + "\n", style="bold")
    body.append(summary + "\n", style="dim")
    body.append_text(heatmap(tokens, values, scale=scale, start=start))
    return body


class MonitorPanels(Horizontal):
    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="monitor-panel"):
            yield Static("", id="panel-0", markup=False)
        with VerticalScroll(classes="monitor-panel", id="second-panel"):
            yield Static("", id="panel-1", markup=False)

    def on_resize(self) -> None:
        self.set_class(self.app.size.width < STACK_BELOW, "stacked")

    def show(self, texts: Sequence[Text], *, follow: bool = False) -> None:
        """One or two answers (none: empty panels). ``follow``: the first panel scrolls to
        its end after the update, unless the reader had scrolled up from it."""
        first = self.query_one(".monitor-panel", VerticalScroll)
        following = follow and first.scroll_y >= first.max_scroll_y
        for index in range(2):
            self.query_one(f"#panel-{index}", Static).update(
                texts[index] if index < len(texts) else ""
            )
        self.query_one("#second-panel").display = len(texts) != 1
        if following:
            self.call_after_refresh(first.scroll_end, animate=False)
