"""The modal every worker error ends in: one line saying what is wrong, dismissed by a key."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class ErrorModal(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("enter", "dismiss", "Close", show=False),
    ]

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.title_text = title
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box"):
            yield Label(self.title_text, id="error-title")
            # Static with markup off: the message is data and may contain "[".
            yield Static(self.message, id="error-message", markup=False)
            yield Label("press Esc to close", id="error-hint")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
