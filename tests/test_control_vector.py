"""llama.cpp control vectors: the file read back with the ``gguf`` package, and the layer
mapping checked by applying the file the way llama.cpp does."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from planted import store_vector

from db import PersonaError, Store
from pipeline.gguf_export import GgufExportParams, export_control_vector
from pipeline.models import load_model
from vectors.control_vector import model_hint, write_control_vector
from vectors.steering import SteeringSpec, steered


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def vector(tiny) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(tiny.num_layers + 1, tiny.hidden_size)


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray], GGUFReader]:
    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return fields, tensors, reader


def test_the_file_reads_back_with_names_shapes_values_and_metadata(tmp_path, vector) -> None:
    path = write_control_vector(
        tmp_path / "cv.gguf", vector, [3, 2], -1.5, hint="llama", provenance={"trait": "t"}
    )
    fields, tensors, reader = _read(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 2
    assert fields["persona.trait"] == "t"
    # Our layer l (added after block l-1) is llama.cpp's direction.(l-1).
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for t in reader.tensors:
        assert t.tensor_type == GGMLQuantizationType.F32
        assert list(t.shape) == [vector.shape[1]]
    np.testing.assert_array_equal(tensors["direction.1"], (-1.5 * vector[2]).numpy())
    np.testing.assert_array_equal(tensors["direction.2"], (-1.5 * vector[3]).numpy())


def _apply_as_llama_cpp(model, path: Path, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's arithmetic, restated: ``common_control_vector_load_one`` writes direction.N
    at offset n_embd*(N-1) of a flat buffer; ``llama_adapter_cvec::apply`` fills tensors[il]
    from offset n_embd*(il-1) for il in 1..n_layer-1; the graph adds tensors[il] to block il's
    output (``build_cvec(cur, il)``) at every position. Returns the logits."""
    _fields, tensors, _reader = _read(path)
    layers = model.model.layers
    d = model.config.hidden_size
    flat = np.zeros(d * len(layers), dtype=np.float32)
    for name, values in tensors.items():
        n = int(name.split(".")[1])
        flat[d * (n - 1) : d * n] += values
    handles = []
    for il in range(1, len(layers)):
        add = torch.from_numpy(flat[d * (il - 1) : d * il].copy())
        if add.any():
            handles.append(
                layers[il].register_forward_hook(
                    lambda _m, _i, out, add=add: (
                        (out[0] + add, *out[1:]) if isinstance(out, tuple) else out + add
                    )
                )
            )
    try:
        with torch.inference_mode():
            return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def test_llama_cpp_adds_the_file_where_we_steer(tiny, vector, tmp_path) -> None:
    ids = torch.tensor([[5, 17, 30, 41, 8, 90, 12]])
    layers, coef = [2, 3], 2.0
    path = write_control_vector(tmp_path / "cv.gguf", vector, layers, coef, hint="llama")
    specs = [SteeringSpec(layer, vector, coef=coef, positions="all") for layer in layers]
    with torch.inference_mode(), steered(tiny.model, specs):
        ours = tiny.model(ids).logits
    with torch.inference_mode():
        plain = tiny.model(ids).logits
    theirs = _apply_as_llama_cpp(tiny.model, path, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, plain, atol=1e-3)
    # Named the way cvector-generator names a state it read (our row l as direction.l), the
    # same row lands one block later: it is our steering at layer l+1, not at l.
    late = tmp_path / "late.gguf"
    writer = gguf.GGUFWriter(str(late), "controlvector")
    writer.add_tensor("direction.2", (coef * vector[2]).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    row_2_at_3 = [SteeringSpec(3, vector[2], coef=coef, positions="all")]
    with torch.inference_mode(), steered(tiny.model, row_2_at_3):
        expected = tiny.model(ids).logits
    torch.testing.assert_close(_apply_as_llama_cpp(tiny.model, late, ids), expected)


def test_export_of_a_stored_vector(tmp_path, tiny_model_dir, vector) -> None:
    with Store(tmp_path / "p.db") as store:
        store_vector(store, "paternalism", str(tiny_model_dir), vector)
        params = GgufExportParams(layers=(3,), coef=0.5)
        path = export_control_vector(store, "paternalism", tmp_path / "out", params)
        assert path.name == "paternalism_response_avg_diff.gguf"
        fields, tensors, _ = _read(path)
        assert fields["controlvector.model_hint"] == "llama"  # from the model's config.json
        assert fields["persona.layers"] == "3" and fields["persona.coef"] == "0.5"
        np.testing.assert_array_equal(tensors["direction.2"], (0.5 * vector[3]).numpy())
        # Without --layers: the recommended layer (here, with no eval answers, 2L/3).
        default = export_control_vector(store, "paternalism", tmp_path / "d")
        assert sorted(_read(default)[1]) == ["direction.1"]


def test_export_errors(tmp_path, tiny_model_dir, vector) -> None:
    with Store(tmp_path / "p.db") as store:
        with pytest.raises(PersonaError, match="has no response_avg_diff vector"):
            export_control_vector(store, "paternalism", tmp_path)
        store_vector(store, "paternalism", str(tiny_model_dir), vector)
        bad = {
            (1,): "direction.0 is refused",
            (4,): r"outside 2\.\.3",
            (): "--layers is empty",
            (2, 2): "names a layer twice",
        }
        for layers, message in bad.items():
            with pytest.raises(PersonaError, match=message):
                export_control_vector(store, "paternalism", tmp_path, GgufExportParams(layers))
        with pytest.raises(PersonaError, match="--coef must be"):
            GgufExportParams(coef=float("nan")).validate()
        with pytest.raises(PersonaError, match="--vector must be one of"):
            GgufExportParams(vector="mean").validate()


def test_model_hint_names_llama_cpp_architectures() -> None:
    assert model_hint("mistral") == "llama"
    assert model_hint("gemma3_text") == "gemma3"
    assert model_hint("qwen2") == "qwen2"
