"""Input validators that ask the pipeline's parameter dataclasses, so a dashboard input
accepts exactly what the command line and the step itself accept."""

from __future__ import annotations

from textual.validation import ValidationResult, Validator

from db import PersonaError
from pipeline.filter import FilterParams
from pipeline.steer import SteeringSetting
from pipeline.sweep import MAX_COEF


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


def steering_setting(coef: str, cap: str) -> SteeringSetting:
    """The monitor's coef and cap inputs as a checked ``SteeringSetting``. The coef is a
    number (0 adds nothing; empty is not 0 but invalid, as a blank T or C is); an empty cap
    caps nothing. Raises ValueError or PersonaError."""
    return SteeringSetting(coef=float(coef), cap=float(cap) if cap.strip() else None).validate()


class SteeringValue(Validator):
    """The monitor's coef or cap as ``steering_setting`` reads it (an invalid value is shown
    and not applied)."""

    WHAT = {
        "coef": f"a finite number within ±{MAX_COEF:g} (0: no steering)",
        "cap": "a finite projection value (empty: none)",
    }

    def __init__(self, field: str) -> None:
        super().__init__(failure_description=self.WHAT[field])
        self.field = field

    def validate(self, value: str) -> ValidationResult:
        try:
            steering_setting(**{"coef": "0", "cap": "", self.field: value})
        except (ValueError, PersonaError):
            return self.failure()
        return self.success()


def steering_problems(coef: str, cap: str) -> list[str]:
    """What is wrong with the monitor's coef and cap texts, one line each (none: valid)."""
    texts = {"coef": coef, "cap": cap}
    return [
        f"{field} '{text}' is not {SteeringValue.WHAT[field]}"
        for field, text in texts.items()
        if not SteeringValue(field).validate(text).is_valid
    ]
