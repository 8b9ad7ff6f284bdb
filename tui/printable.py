"""Text from files, models or the command line as a terminal should show it."""

from __future__ import annotations

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0, 9), *range(11, 32), 127, *range(128, 160))}


def printable(text: object) -> str:
    """Control characters (an ESC starting a clear-screen or window-title sequence; Rich
    drops some control codes but passes ESC through) as visible escapes; newlines and tabs
    kept."""
    return str(text).translate(_CONTROL)
