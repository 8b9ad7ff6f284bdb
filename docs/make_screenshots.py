"""Write the README's screenshots (SVG, from Textual) of a database, e.g. the demo's:

python docs/make_screenshots.py demo.db paternalism
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import Store  # noqa: E402
from tui.app import PersonaApp  # noqa: E402

OUT = Path(__file__).resolve().parent / "screenshots"


async def main(db_path: Path, trait: str) -> None:
    with Store(db_path) as store:
        pos = store.responses(trait=trait, side="pos", split="extract")[0]
        neg = next(r for r in store.responses(trait=trait, side="neg") if r.key == pos.key)
    app = PersonaApp(db_path, trait=trait)
    app.monitor_pair = (pos.id, neg.id)
    async with app.run_test(size=(120, 36)) as pilot:
        for key, name in (
            ("1", "traits"),
            ("2", "jobs"),
            ("3", "review"),
            ("4", "vectors"),
            ("5", "monitor"),
        ):
            await pilot.press(key)
            for _ in range(600):
                await pilot.pause(0.1)
                if not [w for w in app.workers if w.is_running and "poll" not in w.group]:
                    break
            await pilot.pause(0.5)
            app.save_screenshot(str(OUT / f"{name}.svg"))
            print(f"wrote {OUT / f'{name}.svg'}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "paternalism"))
