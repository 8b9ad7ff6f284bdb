"""What every dashboard screen shares: failed workers become a ``WorkerError`` message."""

from __future__ import annotations

from textual.screen import Screen
from textual.worker import Worker, WorkerState

from tui.messages import WorkerError


class PersonaScreen(Screen[None]):
    @property
    def db_path(self):
        return self.app.db_path  # type: ignore[attr-defined]

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # Worker state messages do not bubble; forward failures as one message type.
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            error = event.worker.error
            self.post_message(WorkerError(f"{event.worker.name} failed", str(error) or repr(error)))
