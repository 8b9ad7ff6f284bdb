"""A trait definition as a Rich renderable, built from spans (never markup strings: the text
is user data and may contain "[")."""

from __future__ import annotations

from rich.text import Text

from db import TraitDefinition


def render_trait(trait: TraitDefinition) -> Text:
    text = Text()
    text.append(trait.name, style="bold")
    text.append(f"  ({trait.assistant_label} assistant)\n", style="dim")
    text.append(trait.description + "\n")
    for i, pair in enumerate(trait.instructions, 1):
        text.append(f"\npair {i}\n", style="bold")
        text.append("  pos ", style="bold green")
        text.append(pair.pos + "\n")
        text.append("  neg ", style="bold red")
        text.append(pair.neg + "\n")
    for split in ("extract", "eval"):
        text.append(f"\n{split} questions\n", style="bold")
        for i, question in enumerate(trait.questions_for(split), 1):
            text.append(f"  {i:2d}. ", style="dim")
            text.append(question + "\n")
    text.append("\njudge prompt\n", style="bold")
    text.append(trait.eval_prompt)
    return text
