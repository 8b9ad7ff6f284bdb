import math

import pytest
import torch

from vectors.analysis import (
    LayerSeparation,
    auroc,
    cohens_d,
    cosine_by_layer,
    cosine_matrix,
    layer_norms,
    mean_diff,
    project,
    projections_by_layer,
    recommend_layer,
    separation_by_layer,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    total = 0.0
    for p in pos.tolist():
        for n in neg.tolist():
            if p > n:
                total += 1.0
            elif p == n:
                total += 0.5
    return total / (pos.numel() * neg.numel())


# --- norms and cosines -------------------------------------------------------------------------


def test_layer_norms_matches_linalg_norm() -> None:
    v = torch.randn(5, 16, generator=_gen())
    norms = layer_norms(v)
    assert norms.shape == (5,)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.linalg.norm(v, dim=-1))


def test_layer_norms_float16_input_is_float32() -> None:
    v = torch.full((3, 4), 2.0, dtype=torch.float16)
    norms = layer_norms(v)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.full((3,), 4.0))


def test_layer_norms_rejects_1d() -> None:
    with pytest.raises(ValueError):
        layer_norms(torch.ones(4))


def test_cosine_by_layer_self_negative_and_zero() -> None:
    v = torch.randn(4, 8, generator=_gen(1))
    torch.testing.assert_close(cosine_by_layer(v, v), torch.ones(4))
    torch.testing.assert_close(cosine_by_layer(v, -v), -torch.ones(4))
    zero = torch.zeros(4, 8)
    cos = cosine_by_layer(v, zero)
    assert not torch.isnan(cos).any()
    torch.testing.assert_close(cos, torch.zeros(4))
    assert not torch.isnan(cosine_by_layer(zero, zero)).any()


def test_cosine_by_layer_per_layer_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    cos = cosine_by_layer(a, b)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, torch.tensor([0.0, 1 / math.sqrt(2), 0.0]))


def test_cosine_by_layer_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        cosine_by_layer(torch.ones(3, 4), torch.ones(3, 5))


def test_cosine_matrix_symmetric_sorted_unit_diagonal() -> None:
    g = _gen(2)
    vectors = {name: torch.randn(3, 6, generator=g) for name in ["zeta", "alpha", "mid"]}
    names, matrix = cosine_matrix(vectors, layer=1)
    assert names == ["alpha", "mid", "zeta"]
    assert matrix.shape == (3, 3)
    assert matrix.dtype == torch.float32
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(3))
    expected = cosine_by_layer(vectors["alpha"], vectors["zeta"])[1]
    torch.testing.assert_close(matrix[0, 2], expected)


def test_cosine_matrix_uses_the_requested_layer() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, m0 = cosine_matrix({"a": a, "b": b}, layer=0)
    _, m1 = cosine_matrix({"a": a, "b": b}, layer=1)
    assert m0[0, 1].item() == pytest.approx(1.0)
    assert m1[0, 1].item() == pytest.approx(0.0)


def test_cosine_matrix_zero_vector_no_nan() -> None:
    names, matrix = cosine_matrix({"b": torch.zeros(2, 3), "a": torch.ones(2, 3)}, layer=0)
    assert names == ["a", "b"]
    assert not torch.isnan(matrix).any()
    assert matrix[0, 1].item() == 0.0


def test_cosine_matrix_errors() -> None:
    with pytest.raises(ValueError):
        cosine_matrix({"a": torch.ones(2, 3), "b": torch.ones(3, 3)}, layer=0)
    with pytest.raises(ValueError):
        cosine_matrix({"a": torch.ones(2, 3)}, layer=2)


# --- projections -------------------------------------------------------------------------------


def test_project_matches_manual_dot_over_norm() -> None:
    g = _gen(3)
    states = torch.randn(2, 5, 8, generator=g)
    v = torch.randn(8, generator=g)
    out = project(states, v)
    assert out.shape == (2, 5)
    assert out.dtype == torch.float32
    manual = (states.double() @ v.double()) / v.double().norm()
    torch.testing.assert_close(out, manual.float())


def test_project_hand_case_and_half_input() -> None:
    states = torch.tensor([[3.0, 4.0], [1.0, -1.0]], dtype=torch.float16)
    v = torch.tensor([0.0, 2.0], dtype=torch.float16)
    out = project(states, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([4.0, -1.0]))


def test_project_zero_vector_gives_zeros() -> None:
    states = torch.randn(3, 4, generator=_gen(4))
    out = project(states, torch.zeros(4))
    assert out.shape == (3,)
    assert torch.equal(out, torch.zeros(3))


def test_project_shape_errors() -> None:
    with pytest.raises(ValueError):
        project(torch.ones(3, 4), torch.ones(5))
    with pytest.raises(ValueError):
        project(torch.ones(3, 4), torch.ones(2, 4))


def test_projections_by_layer_uses_each_layers_own_row() -> None:
    # Layer 0 points along x (norm 2), layer 1 along y (norm 5), layer 2 is zero.
    vector = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    states = torch.tensor(
        [
            [[1.0, 7.0], [7.0, 3.0], [9.0, 9.0]],
            [[-4.0, 1.0], [1.0, -2.0], [1.0, 1.0]],
        ]
    )
    out = projections_by_layer(states, vector)
    assert out.shape == (2, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 3.0, 0.0], [-4.0, -2.0, 0.0]]))


def test_projections_by_layer_matches_project_per_layer() -> None:
    g = _gen(5)
    states = torch.randn(6, 4, 8, generator=g)
    vector = torch.randn(4, 8, generator=g)
    out = projections_by_layer(states, vector)
    for layer in range(4):
        torch.testing.assert_close(out[:, layer], project(states[:, layer], vector[layer]))


def test_projections_by_layer_shape_error() -> None:
    with pytest.raises(ValueError):
        projections_by_layer(torch.ones(2, 3, 4), torch.ones(4, 4))


# --- auroc -------------------------------------------------------------------------------------


def test_auroc_perfect_and_reversed() -> None:
    pos = torch.tensor([5.0, 6.0, 7.0])
    neg = torch.tensor([1.0, 2.0])
    assert auroc(pos, neg) == 1.0
    assert auroc(neg, pos) == 0.0


def test_auroc_identical_with_ties_is_half() -> None:
    scores = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0])
    assert auroc(scores, scores.clone()) == pytest.approx(0.5)
    assert auroc(torch.ones(4), torch.ones(7)) == pytest.approx(0.5)


def test_auroc_hand_case_with_tie() -> None:
    # (1>2:0, 1>0:1), (2=2:0.5, 2>0:1), (3>2:1, 3>0:1) -> 4.5 / 6
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0])) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force(seed: int) -> None:
    g = _gen(seed)
    # Integer-valued scores so that many ties occur, plus continuous ones.
    pos = torch.cat([torch.randint(0, 6, (23,), generator=g).float(), torch.randn(7, generator=g)])
    neg = torch.cat([torch.randint(-2, 4, (17,), generator=g).float(), torch.randn(5, generator=g)])
    assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg), abs=1e-12)


def test_auroc_empty_raises() -> None:
    msg = "auroc needs at least one positive and one negative score"
    with pytest.raises(ValueError, match=msg):
        auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=msg):
        auroc(torch.tensor([1.0]), torch.tensor([]))


# --- cohen's d ---------------------------------------------------------------------------------


def test_cohens_d_hand_case() -> None:
    # pos mean 2, var 1; neg mean 5, var 2; pooled var = (2*1 + 1*2) / 3 = 4/3.
    d = cohens_d(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 6.0]))
    assert d == pytest.approx(-3.0 / math.sqrt(4.0 / 3.0))
    assert d == pytest.approx(-3.0 * math.sqrt(3.0) / 2.0)


def test_cohens_d_zero_sd() -> None:
    assert cohens_d(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0, 2.0])) == 0.0
    up = cohens_d(torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0]))
    down = cohens_d(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]))
    assert math.isfinite(up) and math.isfinite(down)
    assert up == 1e9
    assert down == -1e9


def test_cohens_d_constant_sides_with_inexact_values() -> None:
    # Values with no exact binary form: a constant side must still have sd exactly 0.
    assert cohens_d(torch.full((10,), 0.1), torch.full((10,), 0.1)) == 0.0
    assert cohens_d(torch.full((7,), 0.3), torch.full((9,), 0.1)) == 1e9


def test_cohens_d_needs_two_per_side() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        cohens_d(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least 2"):
        cohens_d(torch.tensor([1.0, 2.0]), torch.tensor([]))


# --- separation and layer choice ---------------------------------------------------------------


def _synthetic_projections() -> tuple[torch.Tensor, torch.Tensor]:
    # Columns are layers 0..3.
    pos = torch.tensor(
        [
            [10.0, 0.0, 5.0, 4.5],
            [11.0, 2.0, 6.0, 6.0],
            [12.0, 4.0, 7.0, 7.0],
            [13.0, 6.0, 8.0, 8.0],
            [14.0, 8.0, 9.0, 9.0],
        ]
    )
    neg = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 3.0, 1.0, 1.0],
            [2.0, 5.0, 2.0, 2.0],
            [3.0, 7.0, 3.0, 3.0],
            [4.0, 9.0, 4.0, 5.0],
        ]
    )
    return pos, neg


def test_separation_by_layer_values() -> None:
    pos, neg = _synthetic_projections()
    seps = separation_by_layer(pos, neg)
    assert [s.layer for s in seps] == [0, 1, 2, 3]
    assert all(isinstance(s, LayerSeparation) for s in seps)
    for s in seps:
        col = s.layer
        assert s.auroc == pytest.approx(_brute_auroc(pos[:, col], neg[:, col]))
        assert s.cohens_d == pytest.approx(cohens_d(pos[:, col], neg[:, col]))
        assert s.pos_mean == pytest.approx(pos[:, col].mean().item())
        assert s.neg_mean == pytest.approx(neg[:, col].mean().item())
    assert seps[0].auroc == 1.0
    assert seps[2].auroc == 1.0
    assert seps[1].auroc < 0.5
    assert seps[3].auroc == pytest.approx(24 / 25)
    assert abs(seps[0].cohens_d) > abs(seps[2].cohens_d)


def test_recommend_layer_skips_embeddings() -> None:
    seps = separation_by_layer(*_synthetic_projections())
    assert recommend_layer(seps) == 2
    assert recommend_layer(seps, skip_first=0) == 0
    assert recommend_layer(seps, skip_first=3) == 3


def test_recommend_layer_tie_breaks() -> None:
    seps = [
        LayerSeparation(layer=1, auroc=0.9, cohens_d=1.0, pos_mean=1.0, neg_mean=0.0),
        LayerSeparation(layer=2, auroc=0.9, cohens_d=-2.0, pos_mean=0.0, neg_mean=1.0),
        LayerSeparation(layer=3, auroc=0.9, cohens_d=2.0, pos_mean=1.0, neg_mean=0.0),
        LayerSeparation(layer=4, auroc=0.8, cohens_d=9.0, pos_mean=1.0, neg_mean=0.0),
    ]
    # Layers 2 and 3 tie on AUROC and |d|; the smaller index wins.
    assert recommend_layer(seps) == 2
    assert recommend_layer(list(reversed(seps))) == 2
    # With layer 2 out of the running, the larger |d| (layer 3) beats layer 1.
    assert recommend_layer([s for s in seps if s.layer != 2]) == 3


def test_recommend_layer_nothing_left() -> None:
    seps = separation_by_layer(*_synthetic_projections())
    with pytest.raises(ValueError):
        recommend_layer(seps, skip_first=4)
    with pytest.raises(ValueError):
        recommend_layer([])


def test_separation_by_layer_shape_errors() -> None:
    with pytest.raises(ValueError):
        separation_by_layer(torch.ones(3, 4), torch.ones(3, 5))
    with pytest.raises(ValueError):
        separation_by_layer(torch.ones(3), torch.ones(3))


def test_layer_separation_is_frozen() -> None:
    sep = LayerSeparation(layer=1, auroc=0.5, cohens_d=0.0, pos_mean=0.0, neg_mean=0.0)
    with pytest.raises(AttributeError):
        sep.layer = 2  # type: ignore[misc]


# --- mean diff ---------------------------------------------------------------------------------


def test_mean_diff_matches_float64_reference() -> None:
    g = _gen(6)
    pos = torch.randn(7, 4, 8, generator=g)
    neg = torch.randn(3, 4, 8, generator=g)
    out = mean_diff(pos, neg)
    assert out.shape == (4, 8)
    assert out.dtype == torch.float32
    ref = pos.double().mean(0) - neg.double().mean(0)
    torch.testing.assert_close(out, ref.float())


def test_mean_diff_float16_input_no_overflow() -> None:
    # 200 * 1000 = 200000 overflows float16 (max 65504) if summed before converting.
    pos = torch.full((200, 2, 3), 1000.0, dtype=torch.float16)
    neg = torch.full((100, 2, 3), 999.0, dtype=torch.float16)
    out = mean_diff(pos, neg)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref = pos.double().mean(0) - neg.double().mean(0)
    torch.testing.assert_close(out, ref.float())
    g = _gen(7)
    pos16 = torch.randn(5, 3, 4, generator=g).half()
    neg16 = torch.randn(6, 3, 4, generator=g).half()
    ref16 = pos16.double().mean(0) - neg16.double().mean(0)
    torch.testing.assert_close(mean_diff(pos16, neg16), ref16.float())


def test_mean_diff_errors() -> None:
    with pytest.raises(ValueError):
        mean_diff(torch.zeros(0, 2, 3), torch.ones(1, 2, 3))
    with pytest.raises(ValueError):
        mean_diff(torch.ones(1, 2, 3), torch.zeros(0, 2, 3))
    with pytest.raises(ValueError):
        mean_diff(torch.ones(1, 2, 3), torch.ones(1, 2, 4))


def test_cross_validated_layer_is_honest_about_noise_and_finds_a_signal() -> None:
    from vectors.analysis import cross_validated_layer, recommend_layer, separation_by_layer

    gen = torch.Generator().manual_seed(0)
    questions = [q for q in range(20) for _ in range(10)]  # 20 eval questions, 10 answers each
    pos = torch.randn(200, 12, generator=gen)
    neg = torch.randn(200, 12, generator=gen)
    # No signal anywhere: the best of 11 layers on all answers is picked for its luck; held
    # out, the choice scores as chance, and no layer is chosen stably.
    noise = cross_validated_layer(pos, neg, questions, questions, splits=100)
    best_in_sample = separation_by_layer(pos, neg)[recommend_layer(separation_by_layer(pos, neg))]
    assert noise.heldout_mean < best_in_sample.auroc - 0.02
    assert abs(noise.heldout_mean - 0.5) < 0.04 and noise.stability < 0.6
    # A real signal at layer 7: chosen nearly always, and held out it stays high.
    pos[:, 7] += 1.5
    signal = cross_validated_layer(pos, neg, questions, questions, splits=100)
    assert signal.layer == 7 and signal.stability > 0.9
    assert signal.heldout_mean > 0.8 and signal.heldout_sd < 0.1
    assert "held-out AUROC" in signal.text()
    few = questions[:30]  # three questions
    assert cross_validated_layer(pos[:30], neg[:30], few, few) is None
