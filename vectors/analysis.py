"""Pure tensor math on persona vectors and projections.

Vectors follow the HF ``hidden_states`` convention: a vector has shape [L+1, d], where row 0
is the embedding output and row l is the output of decoder block l-1. Nothing here touches the
database, the pipeline or the TUI.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_LARGE_D = 1e9


def _check_vector(vector: torch.Tensor, name: str = "vector") -> None:
    if vector.ndim != 2:
        raise ValueError(f"{name} must have shape [L+1, d], got {tuple(vector.shape)}")


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    if scores.ndim != 1:
        raise ValueError(f"{name} scores must be 1-D, got shape {tuple(scores.shape)}")
    values = scores.detach().to(torch.float64)
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{name} scores contain NaN")
    return values


def layer_norms(vector: torch.Tensor) -> torch.Tensor:
    """L2 norm of each layer's row of an [L+1, d] vector, as float32 [L+1]."""
    _check_vector(vector)
    return torch.linalg.vector_norm(vector.to(torch.float32), dim=-1)


def cosine_by_layer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-layer cosine similarity of two [L+1, d] vectors; 0.0 where either row is zero."""
    _check_vector(a, "a")
    _check_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    denom = torch.linalg.vector_norm(a64, dim=-1) * torch.linalg.vector_norm(b64, dim=-1)
    dot = (a64 * b64).sum(dim=-1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    cos = torch.where(denom > 0, dot / safe, torch.zeros_like(dot))
    return cos.clamp(-1.0, 1.0).to(torch.float32)


def cosine_matrix(vectors: dict[str, torch.Tensor], layer: int) -> tuple[list[str], torch.Tensor]:
    """Names sorted, and the float32 [n, n] cosine matrix of their rows at ``layer``."""
    names = sorted(vectors)
    if not names:
        return [], torch.zeros(0, 0, dtype=torch.float32)
    shape = vectors[names[0]].shape
    for name in names:
        _check_vector(vectors[name], name)
        if vectors[name].shape != shape:
            raise ValueError(
                f"vector {name!r} has shape {tuple(vectors[name].shape)}, expected {tuple(shape)}"
            )
    n_layers = shape[0]
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range for {n_layers} layers")
    rows = torch.stack([vectors[name][layer].to(torch.float64) for name in names])
    norms = torch.linalg.vector_norm(rows, dim=-1)
    denom = norms[:, None] * norms[None, :]
    dots = rows @ rows.T
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    matrix = torch.where(denom > 0, dots / safe, torch.zeros_like(dots)).clamp(-1.0, 1.0)
    return names, matrix.to(torch.float32)


def project(states: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Scalar projection h . v / |v| over the last dim: states [..., d], vector [d] -> [...]."""
    if vector.ndim != 1:
        raise ValueError(f"vector must be 1-D [d], got shape {tuple(vector.shape)}")
    if states.ndim < 1 or states.shape[-1] != vector.shape[0]:
        raise ValueError(
            f"states last dim must match vector size {vector.shape[0]}, "
            f"got shape {tuple(states.shape)}"
        )
    v = vector.to(torch.float32)
    h = states.to(torch.float32)
    norm = torch.linalg.vector_norm(v)
    if float(norm) == 0.0:
        return torch.zeros(states.shape[:-1], dtype=torch.float32)
    return (h * v).sum(dim=-1) / norm


def projections_by_layer(states: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Per-layer projections: states [N, L+1, d], vector [L+1, d] -> float32 [N, L+1].

    Each layer is projected on its own vector row and divided by that row's norm; a layer whose
    row is zero projects to 0.
    """
    _check_vector(vector)
    if states.ndim != 3 or states.shape[1:] != vector.shape:
        raise ValueError(
            f"states must have shape [N, {vector.shape[0]}, {vector.shape[1]}], "
            f"got {tuple(states.shape)}"
        )
    v = vector.to(torch.float32)
    h = states.to(torch.float32)
    norms = torch.linalg.vector_norm(v, dim=-1)
    dots = (h * v[None]).sum(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, dots / safe, torch.zeros_like(dots))


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (float64), ties sharing their average rank."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, dim=0).to(torch.float64)
    starts = ends - counts.to(torch.float64) + 1.0
    return ((starts + ends) / 2.0)[inverse]


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """AUROC for "pos scores are higher" via Mann-Whitney U, ties counted as 0.5."""
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    p = _check_scores(pos, "pos")
    n = _check_scores(neg, "neg")
    n_pos, n_neg = p.numel(), n.numel()
    ranks = _average_ranks(torch.cat([p, n]))
    rank_sum = float(ranks[:n_pos].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """(mean_pos - mean_neg) / pooled sd (n-1 denominators).

    Returns 0.0 when the pooled sd is 0 and the means are equal, and +/-1e9 (never inf) when the
    pooled sd is 0 but the means differ.
    """
    if pos.numel() < 2 or neg.numel() < 2:
        raise ValueError(
            f"cohens_d needs at least 2 positive and 2 negative scores, "
            f"got {pos.numel()} and {neg.numel()}"
        )
    p = _check_scores(pos, "pos")
    n = _check_scores(neg, "neg")
    n_pos, n_neg = p.numel(), n.numel()
    # A constant side has exactly zero variance, even where float rounding would say otherwise.
    var_pos = 0.0 if bool(p.max() == p.min()) else float(p.var(correction=1))
    var_neg = 0.0 if bool(n.max() == n.min()) else float(n.var(correction=1))
    pooled = math.sqrt(((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2))
    diff = float(p.mean()) - float(n.mean())
    if pooled == 0.0:
        if diff == 0.0:
            return 0.0
        return math.copysign(_LARGE_D, diff)
    d = diff / pooled
    return max(-_LARGE_D, min(_LARGE_D, d))


@dataclass(frozen=True)
class LayerSeparation:
    """How well one layer's projections separate positive from negative responses."""

    layer: int
    auroc: float
    cohens_d: float
    pos_mean: float
    neg_mean: float


def separation_by_layer(pos_proj: torch.Tensor, neg_proj: torch.Tensor) -> list[LayerSeparation]:
    """One LayerSeparation per layer from projections [n_pos, L+1] and [n_neg, L+1]."""
    if pos_proj.ndim != 2 or neg_proj.ndim != 2:
        raise ValueError(
            "projections must have shape [n, L+1], got "
            f"{tuple(pos_proj.shape)} and {tuple(neg_proj.shape)}"
        )
    if pos_proj.shape[1] != neg_proj.shape[1]:
        raise ValueError(
            f"layer count mismatch: {pos_proj.shape[1]} positive vs {neg_proj.shape[1]} negative"
        )
    result = []
    for layer in range(pos_proj.shape[1]):
        p = pos_proj[:, layer]
        n = neg_proj[:, layer]
        result.append(
            LayerSeparation(
                layer=layer,
                auroc=auroc(p, n),
                cohens_d=cohens_d(p, n),
                pos_mean=float(p.to(torch.float64).mean()),
                neg_mean=float(n.to(torch.float64).mean()),
            )
        )
    return result


def recommend_layer(separations: list[LayerSeparation], skip_first: int = 1) -> int:
    """Layer with the highest AUROC, ignoring layers < ``skip_first``.

    Ties go to the larger |cohens_d|, then to the smaller layer index.
    """
    candidates = [s for s in separations if s.layer >= skip_first]
    if not candidates:
        raise ValueError(f"no layers left to recommend after skipping layers < {skip_first}")
    best = max(candidates, key=lambda s: (s.auroc, abs(s.cohens_d), -s.layer))
    return best.layer


@dataclass
class LayerChoice:
    """A layer chosen by held-out AUROC over random splits of the eval questions.

    ``heldout_mean`` / ``heldout_sd``: for each split, the layer best on one half of the
    questions is scored on the other half (a nested estimate: choosing and scoring never see
    the same answers). ``layer`` is the layer with the best mean held-out AUROC;
    ``stability`` the share of splits whose first half picks that layer too."""

    layer: int
    heldout_mean: float
    heldout_sd: float
    stability: float
    splits: int
    in_sample: float  # that layer's AUROC on every eval answer (optimistic)

    def text(self) -> str:
        return (
            f"held-out AUROC {self.heldout_mean:.3f} ± {self.heldout_sd:.3f} "
            f"({self.splits} question splits; chosen in {self.stability:.0%} of them; "
            f"{self.in_sample:.3f} on all answers)"
        )


def cross_validated_layer(
    pos_proj: torch.Tensor,
    neg_proj: torch.Tensor,
    pos_questions: list[int],
    neg_questions: list[int],
    *,
    splits: int = 200,
    seed: int = 0,
    skip_first: int = 1,
) -> LayerChoice | None:
    """The layer to recommend, from projections [n, L+1] whose rows belong to the given eval
    questions; None when fewer than 4 questions have answers on both sides (no split has
    two of them a side)."""
    questions = sorted(set(pos_questions) & set(neg_questions))
    if len(questions) < 4:
        return None
    pos_q = torch.tensor(pos_questions)
    neg_q = torch.tensor(neg_questions)
    layers = list(range(skip_first, pos_proj.shape[1]))
    gen = torch.Generator().manual_seed(seed)

    def aurocs(chosen: torch.Tensor) -> list[float]:
        p = pos_proj[torch.isin(pos_q, chosen)]
        n = neg_proj[torch.isin(neg_q, chosen)]
        return [auroc(p[:, layer], n[:, layer]) for layer in layers]

    heldout_by_layer = torch.zeros(len(layers))
    nested, picks = [], []
    for _ in range(splits):
        order = torch.tensor(questions)[torch.randperm(len(questions), generator=gen)]
        half = len(questions) // 2
        first, second = order[:half], order[half:]
        train, test = aurocs(first), aurocs(second)
        best = max(range(len(layers)), key=lambda i: (train[i], -i))
        nested.append(test[best])
        picks.append(best)
        heldout_by_layer += torch.tensor(test)
    index = int(torch.argmax(heldout_by_layer))
    values = torch.tensor(nested, dtype=torch.float64)
    return LayerChoice(
        layer=layers[index],
        heldout_mean=float(values.mean()),
        heldout_sd=float(values.std()) if len(nested) > 1 else 0.0,
        stability=sum(p == index for p in picks) / len(picks),
        splits=splits,
        in_sample=auroc(pos_proj[:, layers[index]], neg_proj[:, layers[index]]),
    )


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg) in float32: pos [N, L+1, d], neg [M, L+1, d] -> [L+1, d]."""
    if pos.ndim != 3 or neg.ndim != 3:
        raise ValueError(
            "mean_diff inputs must have shape [n, L+1, d], got "
            f"{tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError(
            f"mean_diff needs at least one positive and one negative sample, "
            f"got {pos.shape[0]} and {neg.shape[0]}"
        )
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(f"shape mismatch: {tuple(pos.shape[1:])} vs {tuple(neg.shape[1:])}")
    return pos.to(torch.float32).mean(dim=0) - neg.to(torch.float32).mean(dim=0)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r of two equal-length series; None under 3 points or without spread."""
    if len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)
