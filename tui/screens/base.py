"""What every dashboard screen and modal shares: failed workers become a ``WorkerError``
message, which bubbles to the app's one error handler (the error modal)."""

from __future__ import annotations

from typing import TypeVar

from textual.screen import ModalScreen, Screen
from textual.widgets import Footer
from textual.worker import Worker, WorkerState

from tui.messages import WorkerError

ResultType = TypeVar("ResultType")


class ForwardsWorkerErrors:
    """A screen whose failed workers end in the app's error modal."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Worker state messages do not bubble; forward failures as one message type.
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            error = event.worker.error
            self.post_message(  # type: ignore[attr-defined]
                WorkerError(f"{worker_title(event.worker.name)} failed", str(error) or repr(error))
            )


def worker_title(name: str) -> str:
    """A worker's name as a dialog title: a method name ("load_page") in words."""
    if name.isidentifier() and name == name.lower():
        return name.replace("_", " ").strip().capitalize()
    return name


class PersonaScreen(ForwardsWorkerErrors, Screen[None]):
    @property
    def db_path(self):
        return self.app.db_path  # type: ignore[attr-defined]

    def on_mount(self) -> None:
        # Compact footers without the palette's key (? lists it): at 80 columns every
        # screen's keys fit (Textual calls this before the subclass's own on_mount).
        for footer in self.query(Footer):
            footer.compact = True
            footer.show_command_palette = False


class PersonaModal(ForwardsWorkerErrors, ModalScreen[ResultType]):
    @property
    def db_path(self):
        return self.app.db_path  # type: ignore[attr-defined]
