"""The commands beyond the seed on CUDA, through the real command line on the tiny Llama:
`vectors bake` (the folder loaded on the GPU equals steering there), `shift` of baked
checkpoints against their base (the planted shift's sign at the layer) and `vectors export
--format gguf` (read back with GGUFReader). Skipped without CUDA; the CPU versions are in
tests/test_cli_beyond.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from planted import assert_baked_equals_steered, make_planted_db, planted_vector

from db import Store
from tui.cli import main

TRAIT = "paternalism"
LAYER = 2
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the GPU acceptance suite needs a CUDA device"
    ),
]


@pytest.fixture(scope="module")
def vector() -> torch.Tensor:
    return planted_vector()


@pytest.fixture(scope="module")
def planted_db(tiny_model_dir: Path, vector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database whose paternalism vector (of the tiny model) is planted, not extracted."""
    return make_planted_db(
        tmp_path_factory.mktemp("beyond-gpu") / "persona.db", tiny_model_dir, vector
    )


def persona(db: Path, *argv: object) -> None:
    assert main(["--db", str(db), *map(str, argv)]) == 0


def test_bake_loaded_on_cuda_equals_steering(
    planted_db: Path, tiny_model_dir: Path, vector, tmp_path: Path
) -> None:
    out = tmp_path / "baked"
    persona(planted_db, "vectors", "bake", TRAIT, "--layer", LAYER, "--coef", 2, "--out", out)
    assert_baked_equals_steered(tiny_model_dir, out, vector, LAYER, 2.0, device="cuda")


def test_shift_of_baked_checkpoints_on_cuda(
    planted_db: Path, tiny_model_dir: Path, vector, tmp_path: Path
) -> None:
    coefs = (-1.5, 2.0)
    models = []
    for coef in coefs:
        out = tmp_path / f"baked{coef:+g}"
        bake = ["vectors", "bake", TRAIT, "--layer", LAYER, f"--coef={coef}", "--out", out]
        persona(planted_db, *bake, "--no-verify")
        models += ["--model", out]
    db = make_planted_db(tmp_path / "shift.db", tiny_model_dir, vector)
    judge = f"local:{tiny_model_dir}"
    persona(db, "shift", TRAIT, *models, "--base", tiny_model_dir, "--judge", judge,
            "--max-new-tokens", 4, "--device", "cuda")  # fmt: skip
    with Store(db) as store:
        (job,) = store.list_jobs(kind="shift")
    assert job.status == "done"
    norm = float(vector[LAYER].norm())
    for row, coef in zip(job.stats["table"][1:], coefs, strict=True):
        for readout in ("prompt_last", "response_avg"):
            shift = row[readout]
            # The model runs in bf16 on CUDA: the sign and the size within a few percent.
            assert np.sign(shift[LAYER]) == np.sign(coef)
            assert shift[LAYER] == pytest.approx(coef * norm, rel=0.05)
            assert abs(shift[LAYER - 1]) < 0.05 * abs(shift[LAYER])  # before the baked block


def test_gguf_export_reads_back(planted_db: Path, vector, tmp_path: Path) -> None:
    # A runtime dependency, but a GPU host may lack it: this test alone is then skipped.
    GGUFReader = pytest.importorskip("gguf").GGUFReader  # noqa: N806
    persona(planted_db, "vectors", "export", TRAIT, "--format", "gguf", "--layers", "2-3",
            "--coef", 2, "--out", tmp_path)  # fmt: skip
    reader = GGUFReader(str(tmp_path / f"{TRAIT}_response_avg_diff.gguf"))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # our layer l: direction.(l-1)
    np.testing.assert_array_equal(tensors["direction.1"], (2 * vector[2]).numpy())
    np.testing.assert_array_equal(tensors["direction.2"], (2 * vector[3]).numpy())
