"""Token projection heatmaps as Rich ``Text``: one span per token, built from spans, never
markup (a token may contain "["). Whitespace is made visible: spaces as "·", tabs as "→",
newlines as "↵". Three palettes, chosen from the terminal as the dashboard sees it:

- ``rgb`` (256 colours and more): a diverging background, blue below zero, red above;
- ``ansi16`` (TERM=screen, the Linux console): a 16-colour gradient collapses to white, so
  three steps of each family instead, red above zero and blue below (foreground, background,
  bright bold background);
- ``marks`` (NO_COLOR, or no colour at all): each token followed by a signed step,
  ⁺¹ ⁺² ⁺³ / ⁻¹ ⁻² ⁻³, or ⁰ near zero."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence

from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.text import Text

from tui.printable import printable

NEUTRAL = (245, 245, 245)
HIGH = (214, 39, 40)  # trait up
LOW = (31, 119, 180)  # trait down
PALETTES = ("rgb", "ansi16", "marks")
# |value| / scale at which the steps begin: below the first, a token is near zero.
STEPS = (0.15, 0.45, 0.75)
ANSI16 = {
    1: (Style(color="red"), Style(color="bright_blue")),
    2: (Style(color="black", bgcolor="red"), Style(color="bright_white", bgcolor="blue")),
    3: (
        Style(color="bright_white", bgcolor="bright_red", bold=True),
        Style(color="bright_white", bgcolor="bright_blue", bold=True),
    ),
}
MARKS = {0: "⁰", 1: "¹", 2: "²", 3: "³"}


def visible(token: str) -> str:
    """Whitespace as marks; control characters as escapes (a model's ESC must not drive
    the terminal)."""
    if token.strip() == "" and token:
        token = token.replace(" ", "·")
    return printable(token.replace("\n", "↵\n").replace("\t", "→"))


def colour(value: float, scale: float) -> Color:
    """A diverging colour for ``value`` on [-scale, scale]."""
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    end = HIGH if t >= 0 else LOW
    a = abs(t)
    rgb = tuple(round(n + (e - n) * a) for n, e in zip(NEUTRAL, end, strict=True))
    return Color.from_rgb(*rgb)


def step(value: float, scale: float) -> int:
    """0 near zero, else 1..3 by |value| / scale, signed like the value."""
    t = abs(value) / scale if scale > 0 else 0.0
    level = sum(t >= edge for edge in STEPS)
    return level if value >= 0 else -level


def detect_palette() -> str:
    """The palette for the terminal this process draws on, read as Textual reads it: NO_COLOR,
    else TEXTUAL_COLOR_SYSTEM, else Rich's detection from TERM and COLORTERM."""
    keys = ("NO_COLOR", "TEXTUAL_COLOR_SYSTEM", "TERM", "COLORTERM")
    return _palette_for(tuple((k, os.environ.get(k)) for k in keys))


@functools.cache
def _palette_for(environ: tuple[tuple[str, str | None], ...]) -> str:
    env = {k: v for k, v in environ if v is not None}
    if "NO_COLOR" in env:
        return "marks"
    system = env.get("TEXTUAL_COLOR_SYSTEM", "auto")
    if system == "auto":
        console = Console(file=io.StringIO(), force_terminal=True, _environ=env)
        system = console.color_system or ""
    if system in ("standard", "windows"):
        return "ansi16"
    return "rgb" if system in ("256", "truecolor") else "marks"


def token_style(value: float, scale: float, palette: str) -> Style:
    if palette == "rgb":
        return Style(color="black", bgcolor=colour(value, scale))
    if palette == "ansi16":
        level = step(value, scale)
        return ANSI16[abs(level)][level < 0] if level else Style()
    return Style()


def mark(value: float, scale: float) -> str:
    level = step(value, scale)
    return MARKS[abs(level)] if level == 0 else ("⁺" if level > 0 else "⁻") + MARKS[abs(level)]


def heatmap(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    scale: float | None = None,
    start: int = 0,
    palette: str | None = None,
) -> Text:
    """Tokens from ``start`` on, each in its projection's style (``palette``: one of
    PALETTES, by default the terminal's)."""
    palette = palette or detect_palette()
    shown = list(values[start:])
    if scale is None:
        scale = max((abs(v) for v in shown), default=1.0) or 1.0
    text = Text()
    for token, value in zip(tokens[start:], shown, strict=True):
        style = token_style(value, scale, palette)
        word = token.lstrip(" ")
        if word and word.strip():
            # A word's leading space stays outside its colour: terminals wrap lines there,
            # and a coloured space at a wrap point is lost or moved.
            text.append(" " * (len(token) - len(word)))
            body = visible(word)
        else:
            body = visible(token)
        # A token's mark goes before its line break, on the line the token ends.
        newline = "\n" if palette == "marks" and body.endswith("\n") else ""
        text.append(body[: len(body) - len(newline)], style=style)
        if palette == "marks":
            text.append(mark(value, scale), style="dim")
        text.append(newline)
    return text


def legend(
    scale: float, label: str = "projection", steps: int = 7, palette: str | None = None
) -> Text:
    palette = palette or detect_palette()
    text = Text(f"{label}: ")
    for i in range(steps):
        value = -scale + 2 * scale * i / (steps - 1)
        suffix = mark(value, scale) if palette == "marks" else ""
        text.append(f" {value:+.2g}{suffix} ", style=token_style(value, scale, palette))
    return text
