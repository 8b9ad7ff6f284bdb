"""The dashboard app: five screens switched by number keys (or the command palette), the
selected trait shared between them, and one handler for worker errors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen

from pipeline.filter import DEFAULT_FILTER
from tui.messages import WorkerError
from tui.screens.error import ErrorModal
from tui.screens.jobs import JobsScreen
from tui.screens.monitor import MonitorScreen
from tui.screens.review import ReviewScreen
from tui.screens.traits import TraitsScreen
from tui.screens.vectors import VectorsScreen

SCREENS = {
    "traits": ("1", "Traits", TraitsScreen),
    "jobs": ("2", "Jobs", JobsScreen),
    "review": ("3", "Review", ReviewScreen),
    "vectors": ("4", "Vectors", VectorsScreen),
    "monitor": ("5", "Monitor", MonitorScreen),
}

SCREEN_KEYS = " · ".join(f"{key} {label}" for key, label, _ in SCREENS.values())


class PersonaApp(App[None]):
    TITLE = "persona-studio"
    CSS_PATH = "app.tcss"
    MODES: ClassVar[dict[str, type]] = {name: cls for name, (_, _, cls) in SCREENS.items()}
    DEFAULT_MODE = "traits"
    # The footer shows the screen keys as one "1-5 Screens" and "? Keys": at 80 columns the
    # five names cut off the screen's own keys; ? lists every key, each screen by name.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "toggle_help", "Keys"),
        *(
            Binding(
                key,
                f"switch_mode('{name}')",
                "Screens" if key == "1" else label,
                key_display="1-5" if key == "1" else None,
                show=key == "1",
                tooltip=" · ".join(f"{k} {t}" for k, t, _ in SCREENS.values())
                if key == "1"
                else "",
            )
            for name, (key, label, _) in SCREENS.items()
        ),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+p", "command_palette", "Command palette", show=False),
    ]

    # The trait every screen works on, picked on the Traits screen.
    trait: reactive[str | None] = reactive(None)

    def __init__(self, db_path: str | Path, trait: str | None = None) -> None:
        super().__init__()
        self.db_path = Path(db_path)
        self.thresholds = (DEFAULT_FILTER.threshold, DEFAULT_FILTER.coherence)
        self.set_reactive(PersonaApp.trait, trait)

    def on_mount(self) -> None:
        self._update_subtitle()

    def watch_trait(self, _old: str | None, _new: str | None) -> None:
        self._update_subtitle()

    def _update_subtitle(self) -> None:
        self.sub_title = f"{self.db_path.name} · {self.trait or 'no trait selected'}"

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for name, (key, label, _) in SCREENS.items():
            yield SystemCommand(
                f"Go to {label}",
                f"Switch to the {label} screen (key {key})",
                lambda name=name: self.switch_mode(name),
            )

    def action_toggle_help(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def show_error(self, title: str, message: str) -> None:
        if not isinstance(self.screen, ErrorModal):  # a failing poll must not stack modals
            self.push_screen(ErrorModal(title, message))

    def on_worker_error(self, message: WorkerError) -> None:
        """The one place worker errors surface: as a modal, never a crash."""
        self.show_error(message.title, message.message)
