"""A small modal form: labelled inputs (text or a choice), submitted with ctrl+s or enter on
the last field; returns the values as strings, or None when cancelled."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Select, Static


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    default: str = ""
    choices: tuple[str, ...] = ()  # a Select when given
    placeholder: str = ""


class FormModal(ModalScreen[dict[str, str] | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Submit"),
    ]

    def __init__(self, title: str, fields: list[Field], note: str = "") -> None:
        super().__init__()
        self.form_title = title
        self.fields = fields
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(id="form-box"):
            yield Label(self.form_title, id="form-title")
            with VerticalScroll(id="form-fields"):
                for field in self.fields:
                    yield Label(field.label, classes="form-label")
                    if field.choices:
                        yield Select(
                            [(c, c) for c in field.choices],
                            value=field.default or field.choices[0],
                            allow_blank=False,
                            id=f"field-{field.name}",
                        )
                    else:
                        yield Input(
                            value=field.default,
                            placeholder=field.placeholder,
                            id=f"field-{field.name}",
                        )
            if self.note:
                yield Static(self.note, id="form-note", markup=False)
            yield Label("ctrl+s submit · esc cancel", id="form-hint")

    def on_mount(self) -> None:
        # The first field, not the scroll area: what the user types lands in the form.
        if self.fields:
            self.query_one(f"#field-{self.fields[0].name}").focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_submit()

    def values(self) -> dict[str, str]:
        out = {}
        for field in self.fields:
            widget = self.query_one(f"#field-{field.name}")
            out[field.name] = str(widget.value if widget.value is not None else "").strip()
        return out

    def action_submit(self) -> None:
        self.dismiss(self.values())

    def action_cancel(self) -> None:
        self.dismiss(None)
