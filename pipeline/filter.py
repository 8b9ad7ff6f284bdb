"""Step 4 of the method: effective pairs.

A pos and a neg response pair up by their key (question, instruction, sample), never by row
order. A pair is effective when pos trait >= T, neg trait < 100 - T and both coherences
>= C; a missing score never passes. A hand-made include/exclude override wins over the rule.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from db import PersonaError, Store

REASONS = (
    "effective",
    "included by hand",
    "excluded by hand",
    "unscored",
    "pos too low",
    "neg too high",
    "incoherent",
    "unpaired",
)
FEW_PAIRS = 50


@dataclass(frozen=True)
class FilterParams:
    """The rule's two numbers on the judges' 0-100 scale: T (pos trait >= T, neg trait
    < 100 - T) and C (both coherences >= C). Their one default and one check: the command
    line, ``run``, the dashboard's inputs and extraction all read them from here."""

    threshold: float = 50.0
    coherence: float = 50.0

    def validate(self) -> FilterParams:
        for name, value in (("--threshold", self.threshold), ("--coherence", self.coherence)):
            if not (math.isfinite(value) and 0 <= value <= 100):
                raise PersonaError(f"{name} must be between 0 and 100 (got {value:g})")
        return self


DEFAULT_FILTER = FilterParams()
DEFAULT_THRESHOLD = DEFAULT_FILTER.threshold
DEFAULT_COHERENCE = DEFAULT_FILTER.coherence


@dataclass(frozen=True)
class Pair:
    key: tuple[int, int, int]
    pos_id: int | None
    neg_id: int | None
    pos_trait: float | None
    neg_trait: float | None
    pos_coherence: float | None
    neg_coherence: float | None
    reason: str

    @property
    def effective(self) -> bool:
        return self.reason in ("effective", "included by hand")


@dataclass(frozen=True)
class PairSet:
    trait: str
    pos_job: int
    neg_job: int
    judge: str
    threshold: float
    coherence: float
    pairs: list[Pair]

    @property
    def effective(self) -> list[Pair]:
        return [p for p in self.pairs if p.effective]

    def counts(self) -> dict[str, int]:
        found = Counter(p.reason for p in self.pairs)
        return {reason: found.get(reason, 0) for reason in REASONS}

    def advice(self) -> str | None:
        """The guide's troubleshooting when there are too few pairs to trust a vector."""
        n = len(self.effective)
        if n >= FEW_PAIRS:
            return None
        counts = self.counts()
        lost = ", ".join(f"{r} {c}" for r, c in counts.items() if c and r != "effective")
        return (
            f"only {n} effective pairs (fewer than {FEW_PAIRS}); filtered out: {lost or 'none'}. "
            "Remedies: more samples per question (--n-per-question), stronger pos/neg "
            "instructions, or a lower --threshold / --coherence"
        )


def classify(
    pos_trait: float | None,
    neg_trait: float | None,
    pos_coherence: float | None,
    neg_coherence: float | None,
    threshold: float,
    coherence: float,
) -> str:
    """The rule's verdict for one pair (without overrides)."""
    scores = (pos_trait, neg_trait, pos_coherence, neg_coherence)
    if any(s is None for s in scores):
        return "unscored"
    if pos_trait < threshold:
        return "pos too low"
    if neg_trait >= 100 - threshold:
        return "neg too high"
    if pos_coherence < coherence or neg_coherence < coherence:
        return "incoherent"
    return "effective"


def check_thresholds(threshold: float, coherence: float) -> None:
    FilterParams(threshold, coherence).validate()


def generation_jobs(
    store: Store, trait: str, split: str = "extract", model: str | None = None
) -> tuple[int, int]:
    """The latest pos and neg generation jobs of a trait for a split (and model)."""
    found: dict[str, int] = {}
    for job in store.list_jobs(trait=trait, kind="generate"):
        params = job.params
        if params.get("split", "extract") != split:
            continue
        if model is not None and params.get("model") != model:
            continue
        found[params.get("side", "")] = job.id  # later jobs replace earlier ones
    missing = [side for side in ("pos", "neg") if side not in found]
    if missing:
        raise PersonaError(
            f"trait '{trait}' has no {' or '.join(missing)} generation job on the {split} split; "
            f"run `persona generate {trait} --side both --split {split}` first"
        )
    return found["pos"], found["neg"]


def _check_generation_job(store: Store, trait: str, job_id: int, side: str) -> None:
    """--pos-job/--neg-job name a generation job of this trait on that side (swapped jobs
    would negate the vector without a word)."""
    job = next((j for j in store.list_jobs(trait=trait, kind="generate") if j.id == job_id), None)
    if job is None:
        raise PersonaError(
            f"job {job_id} is not a generation job of trait '{trait}'; `persona jobs list "
            f"--trait {trait}` shows them"
        )
    if job.params.get("side") != side:
        raise PersonaError(
            f"job {job_id} generated {job.params.get('side')} answers, not {side}; pass it as "
            f"--{job.params.get('side')}-job"
        )


def find_pairs(
    store: Store,
    trait: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    coherence: float = DEFAULT_COHERENCE,
    split: str = "extract",
    pos_job: int | None = None,
    neg_job: int | None = None,
    judge: str | None = None,
    record: bool = False,
) -> PairSet:
    check_thresholds(threshold, coherence)
    store.get_trait(trait)
    if pos_job is None or neg_job is None:
        latest_pos, latest_neg = generation_jobs(store, trait, split)
        pos_job = pos_job if pos_job is not None else latest_pos
        neg_job = neg_job if neg_job is not None else latest_neg
    for job_id, side in ((pos_job, "pos"), (neg_job, "neg")):
        _check_generation_job(store, trait, job_id, side)
    if judge is None:
        judges = store.judges_of([pos_job, neg_job])
        if not judges:
            raise PersonaError(
                f"the responses of jobs {pos_job} and {neg_job} are not judged; "
                f"run `persona judge {trait}` first"
            )
        judge = judges[0]
    elif not store.judged_by([pos_job, neg_job], judge):
        # Not "every pair unscored": a misspelt judge is not a judging problem.
        named = ", ".join(store.judges_of([pos_job, neg_job])) or "none yet"
        raise PersonaError(
            f"judge '{judge}' scored none of jobs {pos_job} and {neg_job}; judges that did: "
            f"{named} (leave --judge out for the one with most scores)"
        )
    rows = store.scored_responses([pos_job, neg_job], judge)
    sides: dict[str, dict[tuple[int, int, int], dict]] = {"pos": {}, "neg": {}}
    for row in rows:
        side = "pos" if row["job"] == pos_job else "neg"
        sides[side][(row["question"], row["instruction"], row["sample"])] = row
    overrides = store.overrides(trait)
    pairs = []
    for key in sorted(set(sides["pos"]) | set(sides["neg"])):
        pos, neg = sides["pos"].get(key), sides["neg"].get(key)
        if pos is None or neg is None:
            reason = "unpaired"
        elif key in overrides:
            reason = "included by hand" if overrides[key] else "excluded by hand"
        else:
            reason = classify(
                pos["trait"], neg["trait"], pos["coherence"], neg["coherence"], threshold, coherence
            )
        pairs.append(
            Pair(
                key=key,
                pos_id=pos["id"] if pos else None,
                neg_id=neg["id"] if neg else None,
                pos_trait=pos["trait"] if pos else None,
                neg_trait=neg["trait"] if neg else None,
                pos_coherence=pos["coherence"] if pos else None,
                neg_coherence=neg["coherence"] if neg else None,
                reason=reason,
            )
        )
    result = PairSet(trait, pos_job, neg_job, judge, threshold, coherence, pairs)
    if record:
        record_counts(store, result)
    return result


def record_counts(store: Store, pairs: PairSet) -> None:
    """Keep the filter's counts (the Traits screen and `pairs` show the latest)."""
    store.record_pair_counts(
        trait=pairs.trait,
        pos_job=pairs.pos_job,
        neg_job=pairs.neg_job,
        judge=pairs.judge,
        threshold=pairs.threshold,
        coherence=pairs.coherence,
        counts=pairs.counts(),
    )
