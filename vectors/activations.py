"""Per-job activation files: the three per-response means captured during generation.

While a job runs, each finished batch is written as one shard (temp file + rename, so a kill
never leaves a torn shard under its final name), keyed by the response's
(question, instruction, sample). The shard is written before the batch's rows are committed,
so every stored row has its activations; a row regenerated after a kill rewrites the same
key (the latest shard wins). When the job ends the shards are consolidated into one
``activations.safetensors`` indexed by response id, stored as float32 (float16 lost up to 1%
in differences of close means, and overflows past 65504; an 8B model costs 1.6 MB a
response: 3 kinds x 33 layers x 4096 x 4 bytes).

A file that cannot be read whole (a torn write, a bad disk, an edit) is never used: it is
renamed to ``NAME.torn`` and the responses it held are rebuilt by the caller from their
stored token ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vectors.errors import ActivationFileError
from vectors.files import match_umask

KINDS = ("response_avg", "prompt_avg", "prompt_last")
CONSOLIDATED = "activations.safetensors"
_SHARD_GLOB = "shard-*.safetensors"


def write_shard(
    folder: Path,
    keys: Sequence[tuple[int, int, int]],
    activations: Mapping[str, torch.Tensor],
    response_tokens: Sequence[int],
) -> Path:
    """One batch: ``activations[kind]`` is [n, L+1, d]; returns the shard path."""
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob(_SHARD_GLOB)))
    while (path := folder / f"shard-{index:06d}.safetensors").exists():
        index += 1
    tensors = {kind: activations[kind].to(torch.float32).contiguous() for kind in KINDS}
    tensors["keys"] = torch.tensor([list(k) for k in keys], dtype=torch.int64).reshape(-1, 3)
    tensors["response_tokens"] = torch.tensor(list(response_tokens), dtype=torch.int64)
    _atomic_save(tensors, path)
    return path


Entry = dict[str, torch.Tensor]
Key = tuple[int, int, int]
# Builds the entries of the given keys anew (from their stored token ids).
Rebuild = Callable[[list[Key]], dict[Key, Entry]]


def read_shards(folder: Path) -> tuple[dict[Key, Entry], list[Path]]:
    """Every key's activations from the shards, the latest shard winning, and the torn
    shards found (set aside as ``.torn``, never read)."""
    by_key: dict[Key, Entry] = {}
    torn: list[Path] = []
    for path in sorted(folder.glob(_SHARD_GLOB)):
        try:
            tensors = _load(path)
        except ActivationFileError:
            torn.append(set_aside(path))
            continue
        by_key.update(_entries(tensors))
    return by_key, torn


def set_aside(path: Path) -> Path:
    """Rename an unreadable activation file to ``NAME.torn`` (kept for inspection)."""
    target = path.with_name(path.name + ".torn")
    os.replace(path, target)
    return target


def consolidate(
    folder: Path, key_to_response: Mapping[Key, int], rebuild: Rebuild | None = None
) -> tuple[Path, list[Path], int]:
    """Write ``activations.safetensors`` for exactly the given responses (ordered by id),
    then drop the shards. Entries lost to a torn file (or never captured) come from
    ``rebuild``; without it they raise. Returns the path, the files set aside and how many
    entries were rebuilt."""
    by_key, torn = read_shards(folder)
    if (folder / CONSOLIDATED).exists():
        try:
            earlier = load_by_key(folder)
        except ActivationFileError:
            torn.append(set_aside(folder / CONSOLIDATED))
            earlier = {}
        for key, entry in earlier.items():
            by_key.setdefault(key, entry)
    missing = [k for k in key_to_response if k not in by_key]
    rebuilt = 0
    if missing and rebuild is not None:
        by_key.update(rebuild(missing))
        rebuilt = len(missing)
        missing = [k for k in key_to_response if k not in by_key]
    if missing:
        raise ActivationFileError(
            f"{len(missing)} responses have no captured activations in {folder} "
            f"(first key {missing[0]})"
        )
    ordered = sorted(key_to_response.items(), key=lambda item: item[1])
    tensors = {
        kind: torch.stack([by_key[key][kind] for key, _ in ordered]).to(torch.float32)
        for kind in KINDS
    }
    tensors["response_ids"] = torch.tensor([rid for _, rid in ordered], dtype=torch.int64)
    tensors["keys"] = torch.tensor([list(key) for key, _ in ordered], dtype=torch.int64)
    tensors["response_tokens"] = torch.stack(
        [by_key[key]["response_tokens"] for key, _ in ordered]
    ).to(torch.int64)
    path = folder / CONSOLIDATED
    _atomic_save(tensors, path)
    for shard in folder.glob(_SHARD_GLOB):
        shard.unlink()
    return path, torn, rebuilt


def _entries(tensors: dict[str, torch.Tensor]) -> dict[Key, Entry]:
    out = {}
    for row, key in enumerate(tensors["keys"].tolist()):
        entry = {kind: tensors[kind][row] for kind in KINDS}
        entry["response_tokens"] = tensors["response_tokens"][row]
        out[tuple(key)] = entry
    return out


def load_by_key(folder: Path) -> dict[Key, Entry]:
    return _entries(_load(folder / CONSOLIDATED))


def load_consolidated(path: Path) -> dict[str, torch.Tensor]:
    """The consolidated file's tensors: the three kinds [N, L+1, d] (float32), response_ids,
    keys and response_tokens (files written before float32 hold float16)."""
    return _load(path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        # Copied out of the file's memory map: a file rewritten in place later (an editor,
        # a torn write being tested) must not change tensors already read.
        tensors = {name: t.clone() for name, t in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ActivationFileError(f"activation file {path} is unreadable ({exc})") from None
    needed = {*KINDS, "keys", "response_tokens"}
    if not needed <= set(tensors):
        raise ActivationFileError(f"activation file {path} lacks {sorted(needed - set(tensors))}")
    n = tensors["keys"].shape[0]
    if any(tensors[kind].shape[0] != n for kind in (*KINDS, "response_tokens")):
        raise ActivationFileError(f"activation file {path} has tensors of different lengths")
    return tensors


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        match_umask(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # a full disk, most often
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ActivationFileError(
            f"could not write activation file {path} ({reason}); free disk space and resume "
            "the job (what was not written is generated again)"
        ) from None
