"""Input validators that ask the pipeline's parameter dataclasses, so a dashboard input
accepts exactly what the command line and the step itself accept."""

from __future__ import annotations

from textual.validation import ValidationResult, Validator

from db import PersonaError
from pipeline.filter import FilterParams


class FilterValue(Validator):
    """T or C as the rule's ``FilterParams`` checks it (an invalid value is shown and not
    applied)."""

    def __init__(self, field: str) -> None:
        super().__init__(failure_description="a number from 0 to 100")
        self.field = field

    def validate(self, value: str) -> ValidationResult:
        try:
            FilterParams(**{self.field: float(value)}).validate()
        except (ValueError, PersonaError):
            return self.failure()
        return self.success()
