"""``persona vectors bake TRAIT --layer L --coef C --out DIR``: a Hugging Face model folder
whose weights add C * v after block L-1 at every position, so any engine that serves the
architecture (transformers, vLLM, llama.cpp after ``convert_hf_to_gguf.py``) serves the
steered model. It equals steering with ``positions="all"``.

Where the addition goes: the bias of block L-1's MLP ``down_proj``, the last term added to the
residual stream in a pre-norm block (an attention-output bias would also reach the MLP's
input). transformers gives that bias only to Llama (``mlp_bias=True``, which gives every
gate/up/down projection a bias: all zero except that one). Architectures that are Llama with
other names are written as Llama:
- ``llama``: as it is, with ``mlp_bias=True``.
- ``mistral`` without an active sliding window (Mistral-7B v0.2 and later): the same layers.
- ``qwen2`` without sliding windows (Qwen2/2.5 ship with them off): Llama with
  ``attention_bias=True`` carries its q/k/v biases (the o_proj bias stays zero).
Others are refused: Gemma-2/3 and OLMo-2 normalise the MLP output before the residual add (a
bias there is normalised away), Gemma scales its embeddings, Qwen3 has per-head q/k norms and
Phi-3 partial rotary; none has an MLP output bias.

The folder is checked before it is reported done: it is loaded back with
``AutoModelForCausalLM.from_pretrained`` and its logits on a probe prompt are compared with
the source model's under steering.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from db import PersonaError, Store
from pipeline.analyze import latest_vectors
from pipeline.sweep import MAX_COEF
from vectors.files import KINDS, check_fits, load_vector
from vectors.steering import SteeringSpec, steered

# model_type -> what the baked folder is written as.
BAKEABLE = ("llama", "mistral", "qwen2")
PROVENANCE_FILE = "persona_bake.json"
# Largest relative difference of the probe's logits (baked vs steered) accepted as equal:
# fp32 differs only by summation order; half precision rounds the bias and the sum apart.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
_NOT_LLAMA_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


@dataclass(frozen=True)
class BakeParams:
    layer: int  # hidden-state index: the bias goes on block layer-1
    coef: float
    vector: str = "response_avg_diff"
    model: str | None = None  # the model to bake into; default: the vector's own model
    verify: bool = True  # load the folder back and compare with steering

    def validate(self) -> BakeParams:
        if self.layer < 1:
            raise PersonaError(
                f"--layer {self.layer} is the embedding output; bake at a block output (>= 1)"
            )
        if not (math.isfinite(self.coef) and 0 < abs(self.coef) <= MAX_COEF):
            raise PersonaError(
                f"--coef must be a non-zero number of size at most {MAX_COEF:g} (got {self.coef})"
            )
        if self.vector not in KINDS:
            raise PersonaError(f"--vector must be one of {', '.join(KINDS)}, not '{self.vector}'")
        return self


@dataclass
class BakeResult:
    out: Path
    source: str  # the source model id
    family: str  # the source's model_type
    written_as: str  # the baked folder's model_type
    where: str  # which parameter holds C * v
    probe_error: float | None  # relative logit difference on the probe (None: not verified)


def bake(store: Store, trait: str, out: Path, params: BakeParams) -> BakeResult:
    """Bake the trait's newest vector of ``params.vector`` into a copy of the model."""
    params.validate()
    store.get_trait(trait)
    record = latest_vectors(store, trait).get(params.vector)
    if record is None:
        raise PersonaError(f"trait '{trait}' has no {params.vector} vector; run `persona extract`")
    vector, _meta = load_vector(Path(record.path))
    provenance = {
        "trait": trait,
        "kind": params.vector,
        "vector_file": record.path,
        "vector_model": record.model,
    }
    return bake_vector(params.model or record.model, vector, params, out, provenance=provenance)


def bake_vector(
    model: str,
    vector: torch.Tensor,
    params: BakeParams,
    out: Path,
    *,
    provenance: dict[str, Any] | None = None,
) -> BakeResult:
    """Write ``out``: ``model`` (a ``--model`` value) with coef * vector[layer] added after
    block layer-1 through an MLP output bias. ``vector`` is [L+1, d] or [d]."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import _quiet_transformers, resolve_model

    params.validate()
    _quiet_transformers()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PersonaError(f"--out {out} exists and is not empty; give a new folder")
    resolved = resolve_model(model)
    config = AutoConfig.from_pretrained(resolved.path)
    family = str(config.model_type)
    num_layers = int(config.num_hidden_layers)
    if not 1 <= params.layer <= num_layers:
        raise PersonaError(
            f"--layer must be in 1..{num_layers} for this model (got {params.layer})"
        )
    if vector.dim() == 2:
        check_fits(vector, num_layers, int(config.hidden_size), what="the vector")
        direction = vector[params.layer]
    else:
        direction = vector
    llama_config = _as_llama(config)
    source = AutoModelForCausalLM.from_pretrained(resolved.path, dtype="auto")
    source.eval()
    dtype = next(source.parameters()).dtype
    spec = SteeringSpec(params.layer, direction, coef=params.coef, positions="all")
    probe = _probe_ids(AutoTokenizer.from_pretrained(resolved.path), llama_config.vocab_size)
    reference = _logits(source, probe, [spec]) if params.verify else None

    state = source.state_dict()
    bias = (params.coef * direction.float()).to(dtype)
    _add_biases(state, llama_config, num_layers, params.layer, bias, dtype)
    with torch.device("meta"):
        baked = AutoModelForCausalLM.from_config(llama_config)
    baked.load_state_dict(state, assign=True, strict=True)
    baked.generation_config = source.generation_config
    out.mkdir(parents=True, exist_ok=True)
    try:
        baked.save_pretrained(out)
        AutoTokenizer.from_pretrained(resolved.path).save_pretrained(out)
        where = f"model.layers.{params.layer - 1}.mlp.down_proj.bias"
        record = {
            **(provenance or {}),
            "source_model": resolved.model_id,
            "source_family": family,
            "layer": params.layer,
            "coef": params.coef,
            "bias": where,
            "equals": "steering with positions=all at this layer and coef",
        }
        (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        del source, baked, state
        error = None
        if reference is not None:
            reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
            got = _logits(reloaded, probe, [])
            error = float((got - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
            if not error <= TOLERANCE.get(dtype, 5e-2):
                raise PersonaError(
                    f"the baked model's logits differ from steering by {error:.2g} (relative) "
                    f"on a probe prompt; {family} cannot be baked exactly here"
                )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return BakeResult(out, resolved.model_id, family, llama_config.model_type, where, error)


def _as_llama(config: Any) -> Any:
    """The Llama config the baked folder is written with, or a one-line refusal."""
    from transformers import LlamaConfig

    family = config.model_type
    supported = ", ".join(BAKEABLE)
    if family not in BAKEABLE:
        raise PersonaError(
            f"cannot bake into a {family} model: it has no MLP output bias to carry the vector; "
            f"bake supports {supported} (or export --format gguf for llama.cpp)"
        )
    data = config.to_dict()
    windows = [t for t in data.get("layer_types") or () if t != "full_attention"]
    window = data.get("sliding_window")
    if family == "qwen2":
        active = bool(data.get("use_sliding_window")) or bool(windows)
    else:
        positions = data.get("max_position_embeddings") or 0
        active = window is not None and window < positions
    if family != "llama" and active:
        raise PersonaError(
            f"cannot bake into this {family} model: it uses sliding-window attention "
            f"(window {window}), which the Llama layout that carries the bias lacks; "
            f"bake supports {supported} without sliding windows"
        )
    if family == "llama":
        return LlamaConfig(**{**data, "mlp_bias": True})
    for key in (*_NOT_LLAMA_KEYS, "model_type", "architectures"):
        data.pop(key, None)
    return LlamaConfig(**data, attention_bias=family == "qwen2", mlp_bias=True)


def _add_biases(
    state: dict[str, torch.Tensor],
    config: Any,
    num_layers: int,
    layer: int,
    bias: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """The biases the Llama config declares, zero except block layer-1's down_proj."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sizes = {"mlp.gate_proj": config.intermediate_size, "mlp.up_proj": config.intermediate_size}
    sizes["mlp.down_proj"] = config.hidden_size
    if config.attention_bias:
        sizes |= {
            "self_attn.q_proj": heads * head_dim,
            "self_attn.k_proj": kv_heads * head_dim,
            "self_attn.v_proj": kv_heads * head_dim,
            "self_attn.o_proj": config.hidden_size,
        }
    for index in range(num_layers):
        for module, size in sizes.items():
            key = f"model.layers.{index}.{module}.bias"
            state.setdefault(key, torch.zeros(size, dtype=dtype))
    down = f"model.layers.{layer - 1}.mlp.down_proj.bias"
    state[down] = state[down] + bias


def _probe_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    from pipeline.chat import prompt_ids

    ids = prompt_ids(tokenizer, None, "Tell me about your plans for the week.")
    return torch.tensor([[min(i, vocab_size - 1) for i in ids]])


def _logits(model: Any, ids: torch.Tensor, specs: list[SteeringSpec]) -> torch.Tensor:
    with torch.inference_mode(), steered(model, specs):
        return model(ids.to(model.device)).logits.float().cpu()
