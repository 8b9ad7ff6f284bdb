"""llama.cpp control vectors: a GGUF file that ``llama-cli --control-vector FILE`` (and
``llama-server``) adds to the residual stream at every position, prompt and answer alike
(our ``positions="all"``).

The layer numbering, read from llama.cpp's own code:
- ``common_control_vector_load_one`` (common/common.cpp) parses a tensor ``direction.N`` (N >= 1;
  0 is refused), F32, 1-D, and writes it times the strength at offset ``n_embd * (N - 1)`` of
  one flat buffer ("layer 1 at [0]").
- ``llama_adapter_cvec::apply`` (src/llama-adapter.cpp) fills ``tensors[il]`` from offset
  ``n_embd * (il - 1)`` for il in 1..n_layer-1 (there is never a tensor for il = 0), so
  ``direction.N`` lands in ``tensors[N]``.
- the model graphs (e.g. src/models/llama.cpp) call ``build_cvec(cur, il)`` after block il's
  FFN residual add, just before naming the result ``l_out-il``: the output of 0-based block il,
  before the final norm.
So ``direction.N`` is added to the output of block N. Ours: row l of a vector is the output of
block l-1 and steering at layer l adds there, so **our layer l is ``direction.(l-1)``**, for
l in 2..L. Layer 1 (block 0's output) cannot be written: llama.cpp refuses ``direction.0``.

llama.cpp's ``cvector-generator`` reads ``l_out-il`` and names it ``direction.(il+1)``, which
is applied one block later than it was read; files it (or repeng) writes follow that naming.
Ours are applied exactly where the vector was read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from vectors.files import match_umask

ARCHITECTURE = "controlvector"
# HF ``model_type`` -> llama.cpp's ``general.architecture`` where the two differ (its
# converter writes Mistral as llama, Gemma 3's text model as gemma3). Only a hint: llama.cpp
# does not check it.
_LLAMA_CPP_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


def direction_name(layer: int) -> str:
    """The tensor llama.cpp adds where we steer at ``layer`` (after block layer-1)."""
    return f"direction.{layer - 1}"


def model_hint(model_type: str) -> str:
    """llama.cpp's architecture name for an HF ``model_type`` (``controlvector.model_hint``)."""
    return _LLAMA_CPP_ARCH.get(model_type, model_type)


def writable_layers(num_layers: int) -> range:
    """Our layers a control vector can hold: 2..L (llama.cpp has no ``direction.0``)."""
    return range(2, num_layers + 1)


def control_vector_tensors(
    vector: torch.Tensor, layers: Sequence[int], coef: float
) -> dict[str, torch.Tensor]:
    """``direction.N`` -> coef * vector[N + 1] (float32 [d]) for ``layers`` (our numbering),
    in layer order. ``vector`` is [L+1, d]. The caller checks the layers (a step's params)."""
    if vector.dim() != 2:
        raise ValueError(f"a vector must be [L+1, d], got shape {list(vector.shape)}")
    allowed = writable_layers(vector.shape[0] - 1)
    if not layers or any(layer not in allowed for layer in layers):
        raise ValueError(
            f"layers {list(layers)} must be within {allowed.start}..{allowed.stop - 1}"
        )
    rows = vector.detach().to(dtype=torch.float32, device="cpu")
    return {direction_name(layer): (coef * rows[layer]).contiguous() for layer in sorted(layers)}


def write_control_vector(
    path: Path,
    vector: torch.Tensor,
    layers: Sequence[int],
    coef: float,
    *,
    hint: str,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """Write the GGUF llama.cpp's ``--control-vector`` reads: architecture ``controlvector``,
    ``controlvector.model_hint``, ``controlvector.layer_count`` (the number of direction
    tensors, as llama.cpp's cvector-generator writes it) and one F32 ``direction.N`` each.
    ``provenance`` goes in as ``persona.KEY`` strings, which llama.cpp's loader ignores."""
    import gguf

    tensors = control_vector_tensors(vector, layers, coef)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", hint)
    writer.add_int32(f"{ARCHITECTURE}.layer_count", len(tensors))
    for key, value in (provenance or {}).items():
        writer.add_string(f"persona.{key}", value)
    for name, values in tensors.items():
        writer.add_tensor(name, values.numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    match_umask(tmp)
    tmp.replace(path)
    return path
