"""Reviewed pairs out of the store: the effective pairs (or all of them) with their scores,
the rule's reason and any hand-made override, as the original project's generation CSVs
(``question, prompt, answer, question_id, TRAIT, coherence``, one file a side, rows in key
order) and as JSONL (one pair a line, everything the review shows, keys included).
``persona import-csv`` reads the CSVs back to the same pairs, texts, token ids and scores;
the format has no sample column, so a key's sample comes back as its rank within its
(question, instruction)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db import PersonaError, Store
from pipeline.filter import DEFAULT_COHERENCE, DEFAULT_THRESHOLD, Pair, find_pairs

FORMATS = ("csv", "jsonl")


@dataclass(frozen=True)
class PairExport:
    files: list[Path]
    pairs: int
    judge: str


def export_pairs(
    store: Store,
    trait: str,
    out: Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    coherence: float = DEFAULT_COHERENCE,
    every_pair: bool = False,
    formats: tuple[str, ...] = FORMATS,
) -> PairExport:
    """Write ``TRAIT_pos.csv`` and ``TRAIT_neg.csv`` and/or ``TRAIT_pairs.jsonl`` in ``out``."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise PersonaError(f"--format takes csv and/or jsonl, not '{','.join(formats)}'")
    pair_set = find_pairs(store, trait, threshold=threshold, coherence=coherence)
    pairs = [p for p in pair_set.pairs if every_pair or p.effective]
    pairs = [p for p in pairs if p.pos_id is not None and p.neg_id is not None]
    if not pairs:
        raise PersonaError(
            f"no {'pairs' if every_pair else 'effective pairs'} to export for '{trait}' at "
            f"threshold {threshold:g} / coherence {coherence:g}; lower them or pass --all"
        )
    pairs.sort(key=lambda p: p.key)  # the importer numbers samples in file order
    ids = [i for p in pairs for i in (p.pos_id, p.neg_id)]
    responses = {r.id: r for r in store.responses_by_id(ids)}
    overrides = store.overrides(trait)
    prompts = _prompt_texts(list(responses.values()))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if "csv" in formats:
        for side in ("pos", "neg"):
            path = out / f"{trait}_{side}.csv"
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["question", "prompt", "answer", "question_id", trait, "coherence"])
                for pair in pairs:
                    r = responses[pair.pos_id if side == "pos" else pair.neg_id]
                    score = pair.pos_trait if side == "pos" else pair.neg_trait
                    coh = pair.pos_coherence if side == "pos" else pair.neg_coherence
                    writer.writerow(
                        [
                            r.question_text,
                            prompts[r.id],
                            r.answer,
                            f"{trait}_{r.question}_{side}_{r.instruction}",
                            "" if score is None else score,
                            "" if coh is None else coh,
                        ]
                    )
            files.append(path)
    if "jsonl" in formats:
        path = out / f"{trait}_pairs.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for pair in pairs:
                handle.write(
                    json.dumps(
                        _pair_record(pair, responses, prompts, overrides), ensure_ascii=False
                    )
                    + "\n"
                )
        files.append(path)
    return PairExport(files=files, pairs=len(pairs), judge=pair_set.judge)


def _pair_record(
    pair: Pair, responses: dict[int, Any], prompts: dict[int, str], overrides: dict
) -> dict[str, Any]:
    question, instruction, sample = pair.key
    record: dict[str, Any] = {
        "question": question,
        "instruction": instruction,
        "sample": sample,
        "reason": pair.reason,
        "override": overrides.get(pair.key),
    }
    for side, rid, trait_score, coh in (
        ("pos", pair.pos_id, pair.pos_trait, pair.pos_coherence),
        ("neg", pair.neg_id, pair.neg_trait, pair.neg_coherence),
    ):
        r = responses[rid]
        record[side] = {
            "response_id": rid,
            "question_text": r.question_text,
            "system_prompt": r.system_prompt,
            "prompt": prompts[rid],
            "answer": r.answer,
            "finish_reason": r.finish_reason,
            "trait": trait_score,
            "coherence": coh,
            "model": r.model,
        }
    return record


def _prompt_texts(responses: list[Any]) -> dict[int, str]:
    """Each response's rendered prompt: the stored text of an imported row, else its prompt
    ids decoded by the tokenizer of the model that made them (special tokens kept)."""
    from pipeline.generate import _local_tokenizer

    tokenizers: dict[str, Any] = {}
    out = {}
    for r in responses:
        if r.prompt_text:
            out[r.id] = r.prompt_text
            continue
        if r.model not in tokenizers:
            try:
                tokenizers[r.model] = _local_tokenizer(r.model, required=True)
            except (PersonaError, OSError, ValueError):
                tokenizers[r.model] = None
        tokenizer = tokenizers[r.model]
        if tokenizer is None or not r.prompt_ids:
            raise PersonaError(
                f"cannot render the prompt of response {r.id}: the tokenizer of {r.model} is "
                "not available here; export --format jsonl, or make the model available"
            )
        out[r.id] = tokenizer.decode(r.prompt_ids, skip_special_tokens=False)
    return out
