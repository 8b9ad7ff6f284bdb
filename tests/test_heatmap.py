"""The heatmap in any terminal: in 16 colours positive and negative stay apart (a 256-colour
gradient would collapse to white there); with NO_COLOR each token carries a signed mark."""

from __future__ import annotations

import io

import pytest
from rich.color import ColorSystem
from rich.console import Console
from rich.style import Style

from tui.widgets.heatmap import detect_palette, heatmap, legend

TOKENS = ["strong", " up", " a", " flat", " down", " low", "\n", " "]
VALUES = [1.0, 0.6, 0.3, 0.05, -0.5, -1.0, 0.9, -0.9]


def _styles(palette: str, system: ColorSystem) -> dict[str, tuple]:
    """Each token's (foreground, background, bold) as a terminal of ``system`` receives it."""
    console = Console(file=io.StringIO(), force_terminal=True, color_system=system.name.lower())
    segments = console.render(heatmap(TOKENS, VALUES, scale=1.0, palette=palette))
    out = {}
    for segment in segments:
        if segment.text.strip():
            style = segment.style or Style()
            colours = [c.downgrade(system) if c else None for c in (style.color, style.bgcolor)]
            out[segment.text.strip()] = (*colours, bool(style.bold))
    return out


def test_sixteen_colours_tell_positive_from_negative() -> None:
    styles = _styles("ansi16", ColorSystem.STANDARD)
    up, down = styles["strong"], styles["low"]
    assert up != down and up[1] is not None and down[1] is not None
    assert up[1].name != down[1].name  # bright red against bright blue
    assert len({styles["strong"], styles["up"], styles["a"]}) == 3  # three steps up
    assert styles["flat"] == (None, None, False)  # near zero: the terminal's own colours
    assert styles["↵"] == styles["up"] or styles["↵"][1] is not None  # whitespace is drawn
    # Why: the gradient downgraded to 16 colours gives a weak rise and a fall the same white.
    gradient = _styles("rgb", ColorSystem.STANDARD)
    assert gradient["a"][1].number == gradient["down"][1].number == 7
    assert _styles("ansi16", ColorSystem.STANDARD)["a"] != styles["down"]


def test_no_color_marks_every_token_with_a_signed_step() -> None:
    text = heatmap(TOKENS, VALUES, scale=1.0, palette="marks")
    assert text.plain == "strong⁺³ up⁺² a⁺¹ flat⁰ down⁻² low⁻³↵⁺³\n·⁻³"
    assert not any(span.style and "on " in str(span.style) for span in text.spans)
    assert "⁺³" in legend(1.0, palette="marks").plain


@pytest.mark.parametrize(
    ("environ", "palette"),
    [
        ({"TERM": "screen"}, "ansi16"),
        ({"TERM": "xterm-256color"}, "rgb"),
        ({"TERM": "xterm-256color", "NO_COLOR": "1"}, "marks"),
        ({"TERM": "screen", "TEXTUAL_COLOR_SYSTEM": "truecolor"}, "rgb"),
    ],
)
def test_the_palette_follows_the_terminal(monkeypatch, environ: dict, palette: str) -> None:
    for key in ("TERM", "COLORTERM", "NO_COLOR", "TEXTUAL_COLOR_SYSTEM"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert detect_palette() == palette
