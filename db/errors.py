"""The one error type every layer raises for bad input: a single line saying what is wrong and
how to fix it. The CLI prints it and exits non-zero; the TUI shows it in a modal."""


class PersonaError(Exception):
    """A user-facing problem with a one-line message (what is wrong, and the fix)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnknownTraitError(PersonaError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown trait '{name}'; `persona traits list` shows the known ones")


class UnknownJobError(PersonaError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"unknown job id {job_id}; `persona jobs list` shows the known ones")
