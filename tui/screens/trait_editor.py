"""The trait editor: the definition as studio JSON in a text area, validated as you type
(every broken rule listed under it); ctrl+s saves only a valid definition."""

from __future__ import annotations

import json

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static, TextArea

from db import PersonaError, TraitDefinition
from db.traits import parse_trait_json


def problems_of(text: str) -> tuple[TraitDefinition | None, list[str]]:
    try:
        data = parse_trait_json(text, "the editor's text")
        trait = TraitDefinition.from_dict(data, source="the editor")
    except PersonaError as exc:
        return None, [str(exc)]
    return trait, trait.problems()


class TraitEditor(ModalScreen[TraitDefinition | None]):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, data: dict) -> None:
        super().__init__()
        self.initial = json.dumps(data, indent=2, ensure_ascii=False)

    def compose(self) -> ComposeResult:
        with Vertical(id="editor-box"):
            yield Label("Edit trait (studio JSON) · ctrl+s save · esc cancel", id="editor-title")
            yield TextArea(self.initial, language=None, id="editor-text", soft_wrap=True)
            yield Static("", id="editor-problems", markup=False)

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()
        self._validate()

    def on_text_area_changed(self, _event: TextArea.Changed) -> None:
        self._validate()

    def _validate(self) -> list[str]:
        _trait, problems = problems_of(self.query_one(TextArea).text)
        view = self.query_one("#editor-problems", Static)
        if problems:
            text = Text(f"{len(problems)} problem(s):\n", style="bold red")
            for problem in problems[:8]:
                text.append(f"• {problem}\n")
        else:
            text = Text("valid: ctrl+s saves it", style="bold green")
        view.update(text)
        return problems

    def action_save(self) -> None:
        trait, problems = problems_of(self.query_one(TextArea).text)
        if trait is not None and not problems:
            self.dismiss(trait)

    def action_cancel(self) -> None:
        self.dismiss(None)
