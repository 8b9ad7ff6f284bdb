"""The ``persona`` package turns torch's huge-page CPU allocations on before torch loads
(``tui/cli/memory.py``), unless the user's environment says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's /proc/self/smaps_rollup"
)

# Imports the CLI's package as `persona` does, then allocates 64 MB through torch and reports
# the setting, whether torch had loaded before it, and the process's huge-page memory.
PROBE = """
import os, sys
import tui.cli
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), "torch" in sys.modules)
import torch
x = torch.ones(16 << 20)
rollup = open("/proc/self/smaps_rollup").read()
print(next(int(l.split()[1]) for l in rollup.splitlines() if l.startswith("AnonHugePages")))
"""


def _probe(value: str | None) -> tuple[str, bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = value
    command = [sys.executable, "-c", PROBE]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    setting, torch_loaded, huge_kb = out.stdout.split()
    return setting, torch_loaded == "True", int(huge_kb)


def _madvise_huge_pages() -> bool:
    return THP_MODE.exists() and "[never]" not in THP_MODE.read_text()


def test_the_cli_turns_huge_pages_on_before_torch_loads() -> None:
    setting, torch_loaded, _ = _probe(None)
    assert setting == "1"
    assert not torch_loaded  # torch reads the variable once, at its first allocation


def test_the_users_setting_is_kept() -> None:
    setting, _, huge_kb = _probe("0")
    assert setting == "0"
    if "[madvise]" in (THP_MODE.read_text() if THP_MODE.exists() else ""):
        assert huge_kb < 32 * 1024  # asked for nothing, the 64 MB tensor stayed on 4 KB pages


@pytest.mark.skipif(not _madvise_huge_pages(), reason="the kernel has no transparent huge pages")
def test_a_large_tensor_lands_on_huge_pages() -> None:
    _, _, huge_kb = _probe(None)
    assert huge_kb >= 32 * 1024  # most of the 64 MB tensor
