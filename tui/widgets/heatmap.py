"""Token projection heatmaps as Rich ``Text``: one span per token with a background from a
diverging scale (blue below zero, red above), built from spans, never markup (a token may
contain "["). Whitespace is made visible: spaces as "·", tabs as "→", newlines as "↵"."""

from __future__ import annotations

from collections.abc import Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Text

NEUTRAL = (245, 245, 245)
HIGH = (214, 39, 40)  # trait up
LOW = (31, 119, 180)  # trait down


def visible(token: str) -> str:
    if token.strip() == "" and token:
        return token.replace("\n", "↵\n").replace("\t", "→").replace(" ", "·")
    return token.replace("\n", "↵\n").replace("\t", "→")


def colour(value: float, scale: float) -> Color:
    """A diverging colour for ``value`` on [-scale, scale]."""
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    end = HIGH if t >= 0 else LOW
    a = abs(t)
    rgb = tuple(round(n + (e - n) * a) for n, e in zip(NEUTRAL, end, strict=True))
    return Color.from_rgb(*rgb)


def heatmap(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    scale: float | None = None,
    start: int = 0,
) -> Text:
    """Tokens from ``start`` on, each on its projection's colour."""
    shown = list(values[start:])
    if scale is None:
        scale = max((abs(v) for v in shown), default=1.0) or 1.0
    text = Text()
    for token, value in zip(tokens[start:], shown, strict=True):
        style = Style(color="black", bgcolor=colour(value, scale))
        word = token.lstrip(" ")
        if word and word.strip():
            # A word's leading space stays outside its colour: terminals wrap lines there,
            # and a coloured space at a wrap point is lost or moved.
            text.append(" " * (len(token) - len(word)))
            text.append(visible(word), style=style)
        else:
            text.append(visible(token), style=style)
    return text


def legend(scale: float, label: str = "projection", steps: int = 7) -> Text:
    text = Text(f"{label}: ")
    for i in range(steps):
        value = -scale + 2 * scale * i / (steps - 1)
        text.append(f" {value:+.2g} ", style=Style(color="black", bgcolor=colour(value, scale)))
    return text
