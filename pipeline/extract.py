"""Step 5 of the method: persona vectors from the effective pairs.

For every response three per-layer means are needed: over the response tokens, over the
prompt tokens, and at the last prompt token. They come from the activations captured during
generation (no model needed) or from a forward pass over the stored prompt ids + answer ids
(imported data, an OpenAI-compatible generator, another model). The forward pass runs in
inference mode on length-bucketed batches, with hooks that reduce each layer's output to the
three means inside the batch (pads masked), accumulated in fp32 on the device; only per-side
sums leave it. vector = mean(pos) - mean(neg), shape [L+1, d], one per kind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from db import PersonaError, Store
from db.store import Response, utc_now
from pipeline.chat import token_ids
from pipeline.filter import (
    DEFAULT_COHERENCE,
    DEFAULT_THRESHOLD,
    PairSet,
    find_pairs,
    record_counts,
)
from pipeline.response_means import MEAN_TO_VECTOR, TOKENS_PER_BATCH, ForwardMeans, captured_means
from pipeline.sharding import parse_gpus
from vectors.files import save_vector

# A vector whose layers are this small next to the activations themselves says pos and neg
# barely differ.
TINY_RATIO = 0.01


@dataclass
class Extraction:
    pairs: PairSet
    model: str
    source: str
    vectors: dict[str, torch.Tensor]
    paths: dict[str, Path]
    warnings: list[str] = field(default_factory=list)


def answered(responses: Sequence[Response]) -> int:
    """How many have an answer: token ids, or (a server's row stored without ids) its text."""
    return sum(bool(r.answer_ids or r.answer) for r in responses)


def original_format_vectors(
    store: Store, trait: str, *, model: str | None = None, device: str | None = None
) -> dict[str, torch.Tensor]:
    """The trait's latest vectors in the original project's convention: rows 0..L-1 as
    stored, row L the difference of the means of HF's ``hidden_states[L]`` (the last block's
    output after the final norm) instead of our raw block output. Row L needs a forward pass
    over the effective pairs the vectors were made from (their thresholds, judge and jobs
    are in the vector's provenance)."""
    from pipeline.analyze import latest_vectors
    from pipeline.models import load_model
    from vectors.files import load_vector

    records = latest_vectors(store, trait, model)
    if "response_avg_diff" not in records:
        raise PersonaError(f"trait '{trait}' has no vectors; run `persona extract` first")
    meta = records["response_avg_diff"].metadata
    pairs = find_pairs(
        store,
        trait,
        threshold=meta.get("threshold") if meta.get("threshold") is not None else 0.0,
        coherence=meta.get("coherence") if meta.get("coherence") is not None else 0.0,
        pos_job=meta.get("pos_job"),
        neg_job=meta.get("neg_job"),
        judge=meta.get("judge"),
    )
    if not pairs.effective or meta.get("pos_job") is None:
        raise PersonaError(
            f"the {trait} vectors do not name the pairs they were made from (imported?); "
            "export them with --format studio, or extract again"
        )
    pos = store.responses_by_id([p.pos_id for p in pairs.effective])
    neg = store.responses_by_id([p.neg_id for p in pairs.effective])
    forward = ForwardMeans(
        load_model(model or records["response_avg_diff"].model, device=device), final_norm=True
    )
    sums = {
        side: side_sums(rows, captured=None, forward=forward)
        for side, rows in (("pos", pos), ("neg", neg))
    }
    counts = {side: (answered(rows), len(rows)) for side, rows in (("pos", pos), ("neg", neg))}
    out = {}
    for mean_kind, kind in MEAN_TO_VECTOR.items():
        if kind not in records:
            continue
        vector = load_vector(records[kind].path)[0].clone()
        which = 0 if mean_kind == "response_avg" else 1  # empty answers: as in extract
        pos_mean = sums["pos"][f"{mean_kind}_final"] / counts["pos"][which]
        neg_mean = sums["neg"][f"{mean_kind}_final"] / counts["neg"][which]
        vector[-1] = pos_mean - neg_mean
        out[kind] = vector
    return out


def side_sums(
    responses: Sequence[Response],
    *,
    captured: dict[int, dict[str, torch.Tensor]] | None,
    forward: Any,  # ForwardMeans or ShardedForward (pipeline.sharded_forward)
    tokens_per_batch: int = TOKENS_PER_BATCH,
) -> dict[str, torch.Tensor]:
    """kind -> float32 sum over the responses of their per-response means [L+1, d]."""
    if captured is not None:
        sums: dict[str, torch.Tensor] = {}
        for kind in MEAN_TO_VECTOR:
            total = None
            for r in responses:
                value = captured[r.id][kind].float()
                total = value.clone() if total is None else total.add_(value)
            sums[kind] = total
        return sums
    if forward is None:
        raise PersonaError("no captured activations and no model for a forward pass")
    rows = [token_ids(r, forward.loaded) for r in responses]
    sums = {}
    for _chunk, means in forward.iter_means(rows, tokens_per_batch):
        for kind, value in means.items():
            part = value.sum(0)
            sums[kind] = part if kind not in sums else sums[kind].add_(part)
    return {k: v.cpu() for k, v in sums.items()}


# ---- the step -----------------------------------------------------------------------------------
def extract(
    store: Store,
    trait: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    coherence: float = DEFAULT_COHERENCE,
    source: str = "auto",
    model: str | None = None,
    device: str | None = None,
    pos_job: int | None = None,
    neg_job: int | None = None,
    judge: str | None = None,
    tokens_per_batch: int = TOKENS_PER_BATCH,
    gpus: str | None = None,
) -> Extraction:
    if source not in ("auto", "captured", "forward"):
        raise PersonaError(f"--source must be captured, forward or auto, not '{source}'")
    pairs = find_pairs(
        store,
        trait,
        threshold=threshold,
        coherence=coherence,
        pos_job=pos_job,
        neg_job=neg_job,
        judge=judge,
        record=False,  # recorded once the extraction has passed its checks
    )
    warnings = [w for w in [pairs.advice()] if w]
    effective = pairs.effective
    if not effective:
        raise PersonaError(
            f"no effective pairs for '{trait}' at threshold {threshold:g} / coherence "
            f"{coherence:g} ({_counts_text(pairs)}); lower the thresholds or generate more"
        )
    pos_ids = [p.pos_id for p in effective]
    neg_ids = [p.neg_id for p in effective]
    pos = store.responses_by_id(pos_ids)
    neg = store.responses_by_id(neg_ids)
    gen_params = store.get_job(pairs.pos_job).params
    model_id = model or gen_params.get("model") or pos[0].model
    captured = None
    if source in ("auto", "captured") and model in (None, pos[0].model):
        captured = captured_means(store, pos + neg)
        if captured is None and source == "captured":
            raise PersonaError(
                "some effective responses have no captured activations; use --source forward"
            )
    forward = None
    if captured is None:
        from pipeline.sharded_forward import open_forward

        forward = open_forward(model_id, device=device, gpus=parse_gpus(gpus))
        model_id = forward.loaded.model_id
    used = "captured" if captured is not None else "forward"
    pos_sums = side_sums(pos, captured=captured, forward=forward, tokens_per_batch=tokens_per_batch)
    neg_sums = side_sums(neg, captured=captured, forward=forward, tokens_per_batch=tokens_per_batch)
    # An empty answer has no response mean (its captured or forward mean is a zero
    # placeholder that adds nothing to the sum): response_avg divides by the answers that
    # exist; the prompt kinds use every pair.
    counts = {
        "pos": answered(pos),
        "neg": answered(neg),
    }
    if not counts["pos"] or not counts["neg"]:
        side = "pos" if not counts["pos"] else "neg"
        raise PersonaError(
            f"every {side} answer among the {len(effective)} effective pairs of '{trait}' is "
            "empty, so response_avg_diff does not exist; generate again with more "
            "--max-new-tokens or check the chat template"
        )
    empty = len(pos) - counts["pos"] + len(neg) - counts["neg"]
    if empty:
        warnings.append(
            f"{empty} effective answers are empty (pos {len(pos) - counts['pos']}, neg "
            f"{len(neg) - counts['neg']}): left out of response_avg_diff (a mean over no "
            "tokens does not exist); the prompt kinds use every pair"
        )
    record_counts(store, pairs)
    vectors = {}
    paths = {}
    folder = store.data_dir / "vectors" / trait / _slug(model_id)
    for mean_kind, kind in MEAN_TO_VECTOR.items():
        response = mean_kind == "response_avg"
        pos_mean = pos_sums[mean_kind] / (counts["pos"] if response else len(pos))
        neg_mean = neg_sums[mean_kind] / (counts["neg"] if response else len(neg))
        vector = pos_mean - neg_mean
        vectors[kind] = vector
        norms = vector.norm(dim=-1)
        scale = pos_mean.norm(dim=-1).mean().item()
        if kind == "response_avg_diff" and scale > 0 and norms.mean().item() < TINY_RATIO * scale:
            warnings.append(
                f"the {kind} vector is tiny (mean layer norm {norms.mean().item():.3g} against "
                f"activations of {scale:.3g}): pos and neg barely differ; strengthen the "
                "instructions or check the judged pairs"
            )
        metadata = {
            "trait": trait,
            "model": model_id,
            "kind": kind,
            "source": used,
            "n_pairs": len(effective),
            "threshold": threshold,
            "coherence": coherence,
            "judge": pairs.judge,
            "pos_job": pairs.pos_job,
            "neg_job": pairs.neg_job,
            "generation": {
                k: gen_params.get(k)
                for k in (
                    "model",
                    "n_per_question",
                    "all_instructions",
                    "temperature",
                    "top_p",
                    "max_new_tokens",
                    "seed",
                    "split",
                )
            },
            "layer_norms": [round(float(n), 6) for n in norms],
            "created": utc_now(),
        }
        path = save_vector(folder / f"{kind}.safetensors", vector, metadata)
        store.add_vector(
            trait=trait,
            model=model_id,
            kind=kind,
            path=str(path),
            n_pairs=len(effective),
            threshold=threshold,
            coherence=coherence,
            metadata=metadata,
        )
        paths[kind] = path
    return Extraction(pairs, model_id, used, vectors, paths, warnings)


def _counts_text(pairs: PairSet) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in pairs.counts().items() if n) or "no pairs"


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-80:] or "model"


def run_extract_job(store: Store, job_id: int, *, on_progress: Any = None) -> None:
    """Extraction as a job, so the dashboard can start it like any other step."""
    from pipeline.jobs import JobProgress

    job = store.get_job(job_id)
    progress = JobProgress(store, job_id, total=1, unit="extractions", on_progress=on_progress)
    progress.start()
    result = extract(store, job.trait, **job.params)
    progress.extra.update(
        n_pairs=len(result.pairs.effective),
        source=result.source,
        paths={k: str(v) for k, v in result.paths.items()},
    )
    progress.add(1)
    progress.finish("done", "; ".join(result.warnings))
