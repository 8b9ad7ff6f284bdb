"""Helpers for tests that need a trait's vector stored without running the method (a random
vector saved and registered as extraction would: ``vectors.files.save_vector`` and
``Store.add_vector``), and for planted fine-tunes (a vector baked into a model's weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from db import Store
from vectors.files import save_vector
from vectors.steering import SteeringSpec


def store_vector(
    store: Store,
    trait: str,
    model: str,
    vector: torch.Tensor,
    kind: str = "response_avg_diff",
) -> Path:
    """Register ``vector`` [L+1, d] as the trait's newest ``kind`` vector for ``model``."""
    meta = {"trait": trait, "model": model, "kind": kind, "n_pairs": 0}
    path = save_vector(
        store.data_dir / "vectors" / trait / "planted" / f"{kind}.safetensors", vector, meta
    )
    store.add_vector(
        trait=trait,
        model=model,
        kind=kind,
        path=str(path),
        n_pairs=0,
        threshold=None,
        coherence=None,
        metadata=meta,
    )
    return path


def planted_vector(seed: int = 21, layers: int = 3, hidden: int = 64) -> torch.Tensor:
    """A random [L+1, d] vector, the tiny model's shape by default (3 layers, hidden 64)."""
    torch.manual_seed(seed)
    return torch.randn(layers + 1, hidden)


def make_planted_db(
    db: Path, model: Path, vector: torch.Tensor, trait: str = "paternalism"
) -> Path:
    """A new database at ``db`` whose ``trait`` has ``vector`` as ``model``'s vector."""
    with Store(db) as store:
        store_vector(store, trait, str(model), vector)
    return db


def assert_baked_equals_steered(
    source: Path, baked: Path, vector: torch.Tensor, layer: int, coef: float, device: str = "cpu"
) -> None:
    """The baked folder's hidden states (fp32, teacher-forced on a prompt and an answer) equal
    the source model's under steering at every position to 1e-4; before the layer nothing
    moved (bit-equal on the CPU; on CUDA a bias add may take another kernel), and at it the
    shift is coef * v[layer]."""
    from tiny_model import teacher_forced_states
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.chat import prompt_ids

    def states(folder: Path, steering=()) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        return teacher_forced_states(model.eval(), prompt, answer, steering).cpu()

    tokenizer = AutoTokenizer.from_pretrained(source)
    prompt = prompt_ids(tokenizer, None, "Tell me how to plan a long week of work")
    answer = tokenizer("I would start with a list.", add_special_tokens=False)["input_ids"]
    want = states(source, [SteeringSpec(layer, vector, coef=coef, positions="all")])
    unsteered = states(source)
    got = states(baked)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    before = 0.0 if device == "cpu" else 1e-5
    torch.testing.assert_close(got[:layer], unsteered[:layer], rtol=0, atol=before)
    shift = got[layer] - unsteered[layer]
    torch.testing.assert_close(shift, (coef * vector[layer]).expand_as(shift), rtol=0, atol=1e-4)


DRIFT = 0.4  # the shift above the planted layer, per layer, of every other checkpoint


def planted_shift_stats(
    vector: torch.Tensor, coefs: dict[str, float], traits: dict[str, float], layer: int
) -> dict:
    """A finished shift job's stats for checkpoints with ``vector`` baked at ``layer`` with
    ``coefs`` (model -> coef; the first model of ``traits`` is the base): the projected shift
    is coef * |v[layer]| at that layer, zero before; above it the shift grows (the answer
    average more) and drifts a little by model, so r differs by layer; the correlation is
    computed as the job does."""
    from pipeline.shift import correlations

    norms = vector.norm(dim=1).tolist()
    table = []
    for index, (model, trait) in enumerate(traits.items()):
        coef = coefs.get(model, 0.0)
        row: dict = {"model": model, "base": index == 0, "n": 20, "trait": trait}
        row["coherence"] = None if trait is None else 80.0 + index
        for readout, growth in (("prompt_last", 0.1), ("response_avg", 0.3)):
            row[readout] = [
                0.0
                if at < layer
                else coef * norms[layer] * (1 + growth * (at - layer))
                + DRIFT * (at - layer) * (index % 2)
                for at in range(len(norms))
            ]
        table.append(row)
    return {"unit": "steps", "table": table, "correlation": correlations(table)}


def store_shift_job(store: Store, trait: str, base: str, stats: dict | None) -> int:
    """A shift job row for the checkpoints of ``stats``'s table, done with those stats (or,
    with None, still running at 40%), written through the store as a worker would."""
    from pipeline.shift import ShiftParams

    models = tuple(row["model"] for row in (stats or {}).get("table", [])[1:]) or ("ckpt",)
    params = ShiftParams(models=models, base=base, judge=f"local:{base}")
    job = store.create_job("shift", trait, params.to_dict())
    if stats is None:
        store.update_job(job.id, status="running", done=40, total=100, stats={"unit": "steps"})
    else:
        store.update_job(job.id, status="done", done=100, total=100, stats=stats)
    return job.id
