"""The dashboard app: screens switched by number keys, one handler for worker errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from tui.messages import WorkerError
from tui.screens.error import ErrorModal
from tui.screens.traits import TraitsScreen


class PersonaApp(App[None]):
    TITLE = "persona-studio"
    CSS_PATH = "app.tcss"
    MODES: ClassVar[dict[str, type]] = {"traits": TraitsScreen}
    DEFAULT_MODE = "traits"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('traits')", "Traits"),
        Binding("question_mark", "toggle_help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, db_path: str | Path) -> None:
        super().__init__()
        self.db_path = Path(db_path)

    def on_mount(self) -> None:
        self.sub_title = self.db_path.name

    def action_toggle_help(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def on_worker_error(self, message: WorkerError) -> None:
        """The one place worker errors surface: as a modal, never a crash."""
        if not isinstance(self.screen, ErrorModal):  # a failing poll must not stack modals
            self.push_screen(ErrorModal(message.title, message.message))
