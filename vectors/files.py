"""Vector files: safetensors with the provenance in the header metadata and in a JSON sidecar,
and the original project's ``{trait}_{kind}.pt`` float32 tensors for export and import.

A ``.pt`` file is read with ``torch.load(weights_only=True)``, so a file holding pickled
objects is refused instead of executed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vectors.errors import VectorFileError

KINDS = ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")
LAYER_CONVENTION = (
    "index 0 = embedding output; index l = output of decoder block l-1 (raw, before the final "
    "norm, for every l)"
)


def save_vector(path: Path, vector: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """Write ``vector`` [L+1, d] as float32 safetensors with ``metadata`` in its header (JSON
    under the key ``persona``) and beside it as ``PATH.json``; both are replaced atomically."""
    if vector.dim() != 2:
        raise VectorFileError(f"a vector must be [L+1, d], got shape {list(vector.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**metadata, "shape": list(vector.shape), "layer_convention": LAYER_CONVENTION}
    header = {"persona": json.dumps(meta, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"vector": vector.detach().float().contiguous().cpu()}, str(tmp), metadata=header)
    match_umask(tmp)
    os.replace(tmp, path)
    sidecar = path.with_suffix(path.suffix + ".json")
    tmp_json = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_json, sidecar)
    return path


def load_vector(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            vector = handle.get_tensor("vector")
            header = handle.metadata() or {}
    except (SafetensorError, OSError, KeyError) as exc:
        raise VectorFileError(
            f"vector file {path} is unreadable ({exc}); run `persona extract` again to rewrite it"
        ) from None
    try:
        meta = json.loads(header.get("persona", "{}"))
    except json.JSONDecodeError:
        raise VectorFileError(
            f"vector file {path} has a damaged provenance header; run `persona extract` again "
            "to rewrite it"
        ) from None
    return vector, meta


def check_fits(vector: torch.Tensor, num_layers: int, hidden: int, *, what: str) -> None:
    """Refuse a vector whose shape is not [num_layers + 1, hidden]: it was made for another
    model, and projecting or steering with it would fail deep inside a forward pass."""
    want = [num_layers + 1, hidden]
    if list(vector.shape) != want:
        raise VectorFileError(
            f"{what} has shape {list(vector.shape)} but the model needs {want} "
            f"({num_layers} layers + embeddings, hidden {hidden}); is it for another model?"
        )


def export_pt(vector: torch.Tensor, path: Path) -> Path:
    """The original project's format: a bare float32 tensor [L+1, d]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vector.detach().float().cpu().clone(), path)
    return path


def import_pt(path: Path, *, num_layers: int | None = None, hidden: int | None = None):
    """A ``.pt`` vector, refusing pickled objects and shapes that do not fit the model."""
    if path.is_dir():
        raise VectorFileError(f"{path} is a folder; pass the .pt file itself")
    if path.exists() and not path.is_file():  # a FIFO would wait forever
        raise VectorFileError(f"{path} is not a regular file; pass the .pt file itself")
    try:
        with warnings.catch_warnings():  # torch's own warnings would add lines to the error
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VectorFileError(f"{path} does not exist; check the path") from None
    except Exception as exc:  # torch raises UnpicklingError and friends for unsafe content
        raise VectorFileError(_refusal(path, exc)) from None
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, torch.Tensor) and data.layout != torch.strided:
        raise VectorFileError(f"{path} holds a {data.layout} tensor; a vector is a dense tensor")
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        shape = list(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise VectorFileError(f"{path} must hold one [L+1, d] tensor, found {shape}")
    if data.is_floating_point():
        data = data.float()  # what is stored: a float64 of 1e300 is inf in float32
    if not data.is_floating_point() or not torch.isfinite(data).all():
        # NaN or inf would turn every projection and steered answer into NaN, far from here.
        raise VectorFileError(
            f"{path} holds {'NaN or infinite' if data.is_floating_point() else data.dtype} "
            "values; a vector must be finite floats"
        )
    if num_layers is not None and hidden is not None:
        check_fits(data, num_layers, hidden, what=str(path))
    return data.float()


def _refusal(path: Path, exc: BaseException) -> str:
    """One line for a ``.pt`` that ``torch.load(weights_only=True)`` would not read. Torch's
    own message is a paragraph of advice to turn the safety off; keep only the reason."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch bolds part of it with ANSI codes
    # Torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module..."
    pickled = re.search(r"GLOBAL ([\w.]+)", text)
    if pickled:
        return (
            f"{path} holds a pickled Python object ({pickled.group(1)}), not only tensors; "
            "weights_only refused it and ran nothing. Save the bare tensor with "
            "torch.save(tensor, path)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        reason = f"weights_only refused it: {detail.group(1).strip()}"
    elif isinstance(exc, EOFError):
        reason = "the file is empty"
    else:
        lines = text.strip().splitlines()
        reason = lines[0].split(". ")[0][:160] if lines else type(exc).__name__
    return (
        f"{path} is not a tensor file written by torch.save ({reason}); check the file or "
        "save the tensor again with torch.save(tensor, path)"
    )


def match_umask(path: Path) -> None:
    """Give a file written through a temp name the mode the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
