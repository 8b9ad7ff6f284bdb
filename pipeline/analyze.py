"""What a vector is worth: per-layer norms for each kind, cosine similarity to the other
traits' vectors, and per-layer separation of the eval split (AUROC and Cohen's d of the
response-average projections of pos vs neg eval answers), with a recommended layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from db import PersonaError, Store
from db.store import Response, VectorRecord
from pipeline.chat import token_ids
from pipeline.filter import generation_jobs
from pipeline.response_means import TOKENS_PER_BATCH, ForwardMeans, captured_means
from vectors.analysis import (
    LayerChoice,
    LayerSeparation,
    cosine_by_layer,
    cosine_matrix,
    cross_validated_layer,
    layer_norms,
    projections_by_layer,
    recommend_layer,
    separation_by_layer,
)
from vectors.files import load_vector


@dataclass
class TraitReport:
    trait: str
    model: str
    records: dict[str, VectorRecord]
    norms: dict[str, list[float]]
    separation: list[LayerSeparation] | None = None
    recommended_layer: int | None = None
    choice: LayerChoice | None = None  # how the recommended layer was chosen, and how stably
    # From the latest finished sweep of this trait and model: the setting that raised the
    # trait most at mean coherence >= 50 (steering is judged, not inferred from AUROC).
    steering: dict[str, Any] | None = None
    eval_counts: tuple[int, int] = (0, 0)
    similarity: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def default_layer(self) -> int:
        """The layer to look at first (the one default-layer rule, ``fallback_layer``)."""
        if self.recommended_layer is not None:
            return self.recommended_layer
        return fallback_layer(len(self.norms["response_avg_diff"]) - 1)


def latest_vectors(store: Store, trait: str, model: str | None = None) -> dict[str, VectorRecord]:
    """The newest vector of each kind for a trait (and model)."""
    found: dict[str, VectorRecord] = {}
    for record in store.vectors(trait=trait):
        if model is None or record.model == model:
            found[record.kind] = record  # ordered by id: later ones win
    return found


def response_avg_projections(
    store: Store,
    responses: list[Response],
    vector: torch.Tensor,
    *,
    forward: ForwardMeans | None = None,
    captured: dict[int, dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """[N, L+1] projections of each response's response-average state on ``vector``, from
    ``captured`` means when given (read here when not), else by ``forward``."""
    if captured is None and forward is None:
        captured = captured_means(store, responses)
    if captured is not None:
        states = torch.stack([captured[r.id]["response_avg"].float() for r in responses])
        return projections_by_layer(states, vector)
    if forward is None:
        raise PersonaError("the eval responses have no captured activations; pass a model")
    out = torch.zeros(len(responses), vector.shape[0])
    rows = [token_ids(r, forward.loaded) for r in responses]
    device_vector = vector.to(forward.loaded.device)
    for chunk, means in forward.iter_means(rows, TOKENS_PER_BATCH):
        out[chunk] = projections_by_layer(means["response_avg"], device_vector).cpu()
    return out


def analyze(store: Store, trait: str, *, model: str | None = None, device: str | None = None):
    records = latest_vectors(store, trait, model)
    if "response_avg_diff" not in records:
        raise PersonaError(f"trait '{trait}' has no vectors yet; run `persona extract {trait}`")
    model_id = records["response_avg_diff"].model
    vectors = {kind: load_vector(r.path)[0] for kind, r in records.items()}
    report = TraitReport(
        trait=trait,
        model=model_id,
        records=records,
        norms={kind: layer_norms(v).tolist() for kind, v in vectors.items()},
    )
    main = vectors["response_avg_diff"]
    for other in store.list_traits():
        if other.name == trait:
            continue
        theirs = latest_vectors(store, other.name, model_id).get("response_avg_diff")
        if theirs is not None:
            report.similarity[other.name] = cosine_by_layer(
                main, load_vector(theirs.path)[0]
            ).tolist()
    report.steering = steering_from_sweep(store, trait, model_id)
    try:
        pos_job, neg_job = generation_jobs(store, trait, "eval", model=None)
    except PersonaError:
        report.notes.append(
            f"no eval-split generations: run `persona generate {trait} --side both --split eval` "
            "for the per-layer AUROC"
        )
        return report
    pos = store.responses(job=pos_job)
    neg = store.responses(job=neg_job)
    if len(pos) < 2 or len(neg) < 2:
        report.notes.append("fewer than two eval answers a side: no separation computed")
        return report
    forward = None
    captured = None
    # Captured activations are the generator's; a vector of another model needs its own pass.
    if all(r.model == model_id for r in pos + neg):
        captured = captured_means(store, pos + neg)  # the activation files, read once
    if captured is None:
        from pipeline.models import load_model

        forward = ForwardMeans(load_model(model_id, device=device))
    pos_proj = response_avg_projections(store, pos, main, forward=forward, captured=captured)
    neg_proj = response_avg_projections(store, neg, main, forward=forward, captured=captured)
    report.separation = separation_by_layer(pos_proj, neg_proj)
    # Chosen on held-out questions: the best layer on all eval answers, scored on the same
    # answers, overstates its AUROC (the demo: 0.785 in-sample against 0.72 held out).
    report.choice = cross_validated_layer(
        pos_proj, neg_proj, [r.question for r in pos], [r.question for r in neg]
    )
    if report.choice is not None:
        report.recommended_layer = report.choice.layer
    else:
        report.recommended_layer = recommend_layer(report.separation)
        report.notes.append(
            "fewer than 4 eval questions answered on both sides: the recommended layer is the "
            "best on all answers, and its AUROC is optimistic"
        )
    report.eval_counts = (len(pos), len(neg))
    return report


def steering_from_sweep(store: Store, trait: str, model_id: str) -> dict[str, Any] | None:
    """The best raising setting of the newest finished sweep of this trait whose vector was
    this model's, with the sweep's unsteered baseline and its job id; None without one."""
    for job in reversed(store.list_jobs(trait=trait, kind="sweep")):
        best = (job.stats or {}).get("best") or {}
        model = job.params.get("model") or model_id
        if job.status == "done" and best.get("up") and model == model_id:
            return {"job": job.id, **best["up"], "baseline": best.get("baseline")}
    return None


def steering_text(steering: dict[str, Any]) -> str:
    base = (steering.get("baseline") or {}).get("trait")
    against = f" (unsteered {base:.1f})" if base is not None else ""
    return (
        f"steering layer {steering['layer']} from sweep job {steering['job']}: coef "
        f"{steering['coef']:+g} raised the trait to {steering['trait']:.1f}{against} at mean "
        f"coherence {steering['coherence']:.1f}"
    )


def fallback_layer(num_layers: int) -> int:
    """The default-layer rule when no layer is recommended (no eval split, no vectors): two
    thirds of the way up the model, where persona directions usually separate best."""
    return (2 * num_layers) // 3


def default_layer(store: Store, trait: str, num_layers: int) -> int:
    """The layer to look at first: the recommended one (best held-out eval AUROC), else
    ``fallback_layer``."""
    try:
        layer = analyze(store, trait).recommended_layer
    except PersonaError:
        layer = None
    return layer if layer is not None else fallback_layer(num_layers)


def trait_cosines(store: Store, model_id: str, layer: int) -> tuple[list[str], torch.Tensor]:
    """Trait names and the cosine matrix at ``layer`` of the latest response_avg_diff vectors
    of every trait that has one for ``model_id``."""
    vectors = {}
    for summary in store.list_traits():
        record = latest_vectors(store, summary.name, model_id).get("response_avg_diff")
        if record is not None:
            vectors[summary.name] = load_vector(record.path)[0]
    return cosine_matrix(vectors, layer)


def report_rows(report: TraitReport) -> list[dict[str, Any]]:
    """One row per layer: norms of each kind, and separation where computed."""
    rows = []
    n_layers = len(report.norms["response_avg_diff"])
    for layer in range(n_layers):
        row: dict[str, Any] = {"layer": layer}
        for kind, norms in report.norms.items():
            row[kind] = norms[layer]
        if report.separation is not None:
            row["auroc"] = report.separation[layer].auroc
            row["cohens_d"] = report.separation[layer].cohens_d
        row["recommended"] = layer == report.recommended_layer
        rows.append(row)
    return rows
