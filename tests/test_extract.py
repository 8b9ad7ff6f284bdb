from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_model import teacher_forced_means

from db import PersonaError, Store
from pipeline.analyze import analyze
from pipeline.extract import extract
from pipeline.filter import classify, find_pairs
from pipeline.models import load_model
from pipeline.response_means import ForwardMeans
from vectors.files import VectorFileError, export_pt, import_pt, load_vector


@pytest.mark.parametrize("padding", ["left", "right"])
def test_batched_forward_equals_one_at_a_time(tiny_model_dir: Path, padding: str) -> None:
    loaded = load_model(str(tiny_model_dir))
    rng = random.Random(0)
    rows = [
        (
            [rng.randrange(3, 300) for _ in range(rng.randint(3, 30))],
            [rng.randrange(3, 300) for _ in range(rng.randint(1, 25))],
        )
        for _ in range(7)
    ]
    forward = ForwardMeans(loaded, padding=padding)
    seen = set()
    for chunk, means in forward.iter_means(rows, tokens_per_batch=120):
        for j, index in enumerate(chunk):
            seen.add(index)
            ref = teacher_forced_means(loaded.model, *rows[index])
            for kind, value in ref.items():
                torch.testing.assert_close(means[kind][j], value, rtol=1e-4, atol=1e-5)
    assert seen == set(range(7))


def test_the_rule() -> None:
    assert classify(50, 49, 50, 50, 50, 50) == "effective"
    assert classify(49.9, 0, 90, 90, 50, 50) == "pos too low"
    assert classify(90, 50, 90, 90, 50, 50) == "neg too high"
    assert classify(90, 10, 49, 90, 50, 50) == "incoherent"
    assert classify(90, 10, None, 90, 50, 50) == "unscored"


def test_pairs_by_key_with_overrides(generated: Path, tmp_path: Path) -> None:
    with Store(generated) as store:
        pairs = find_pairs(store, "paternalism")
        counts = pairs.counts()
        assert len(pairs.pairs) == 40
        assert counts["pos too low"] == 2 and counts["effective"] == 38
        for pair in pairs.pairs:
            pos, neg = store.get_response(pair.pos_id), store.get_response(pair.neg_id)
            assert pos.key == neg.key == pair.key and pos.side == "pos" and neg.side == "neg"
        low = next(p for p in pairs.pairs if p.reason == "pos too low")
        good = next(p for p in pairs.pairs if p.reason == "effective")
        store.set_override("paternalism", low.key, True)
        store.set_override("paternalism", good.key, False)
        again = find_pairs(store, "paternalism", record=True).counts()
        assert again["included by hand"] == 1 and again["excluded by hand"] == 1
        assert again["effective"] == 37
        assert store.latest_pair_counts("paternalism")["counts"] == again
        store.set_override("paternalism", low.key, None)
        store.set_override("paternalism", good.key, None)
        strict = find_pairs(store, "paternalism", threshold=85)
        assert strict.counts()["pos too low"] == 40 and not strict.effective
        assert "fewer than 50" in strict.advice()


def test_pairs_match_by_key_not_row_order(generated: Path) -> None:
    """Rows of the neg job stored in another order (and one missing) still pair by key."""
    with Store(generated) as store:
        pos_job, neg_job = (j.id for j in store.list_jobs(kind="generate")[:2])
        neg_rows = store.responses(job=neg_job)
        shuffled = store.create_job("generate", "paternalism", {"side": "neg", "split": "extract"})
        moved = [
            {
                **{
                    k: getattr(r, k)
                    for k in (
                        "trait",
                        "side",
                        "split",
                        "question",
                        "instruction",
                        "sample",
                        "question_text",
                        "system_prompt",
                        "prompt_ids",
                        "answer_ids",
                        "answer",
                        "finish_reason",
                        "model",
                    )
                },
                "job": shuffled.id,
            }
            for r in reversed(neg_rows[1:])
        ]
        store.add_responses(moved)
        try:
            pairs = find_pairs(
                store, "paternalism", pos_job=pos_job, neg_job=shuffled.id, judge="hand"
            )
            by_key = {p.key: p for p in pairs.pairs}
            assert by_key[neg_rows[0].key].reason == "unpaired"
            for pair in pairs.pairs:
                if pair.neg_id is not None:
                    assert store.get_response(pair.neg_id).key == pair.key
        finally:  # the fixture database is shared: leave it as it was
            with store.transaction():
                store.db["jobs"].delete(shuffled.id)


def test_captured_and_forward_paths_agree(generated: Path) -> None:
    with Store(generated) as store:
        captured = extract(store, "paternalism", source="captured")
        forward = extract(store, "paternalism", source="forward")
    assert captured.source == "captured" and forward.source == "forward"
    assert len(captured.pairs.effective) == 38
    for kind, vector in captured.vectors.items():
        assert vector.shape == (4, 64)
        # Every layer, relative to its norm (float16 storage was up to 1% off here); layer 0
        # of prompt_last is exactly 0 (pos and neg end on the same template token).
        scale = forward.vectors[kind].norm(dim=-1).clamp(min=1e-6)
        error = (vector - forward.vectors[kind]).norm(dim=-1) / scale
        assert error.max() < 1e-3, (kind, error)


def test_activation_files_keep_large_and_close_values(tmp_path: Path) -> None:
    """Massive activations (past float16's 65504) and differences far below float16's
    resolution survive a shard and the consolidated file."""
    from vectors import activations

    keys = [(0, 0, 0), (1, 0, 0)]
    value = torch.tensor([[70000.0, 1.0001, -3.0], [1e-4, 2000.25, 5.0]])
    stacked = {kind: torch.stack([value, value + 1e-3]) for kind in activations.KINDS}
    activations.write_shard(tmp_path, keys, stacked, [3, 4])
    activations.consolidate(tmp_path, {keys[0]: 10, keys[1]: 11}, None)
    loaded = activations.load_by_key(tmp_path)
    for row, key in enumerate(keys):
        for kind in activations.KINDS:
            assert torch.equal(loaded[key][kind], stacked[kind][row])


def test_vector_files_are_self_describing(generated: Path, tmp_path: Path) -> None:
    with Store(generated) as store:
        result = extract(store, "paternalism", threshold=40, coherence=60)
        vector, meta = load_vector(result.paths["response_avg_diff"])
        assert torch.equal(vector, result.vectors["response_avg_diff"])
        assert meta["trait"] == "paternalism" and meta["n_pairs"] == 38
        assert meta["threshold"] == 40 and meta["judge"] == "hand"
        assert meta["layer_convention"].startswith("index 0 = embedding")
        assert len(meta["layer_norms"]) == 4 and meta["generation"]["n_per_question"] == 2
        assert result.paths["response_avg_diff"].with_suffix(".safetensors.json").exists()
        kinds = {r.kind for r in store.vectors(trait="paternalism")}
        assert kinds == {"response_avg_diff", "prompt_avg_diff", "prompt_last_diff"}
    pt = export_pt(vector, tmp_path / "paternalism_response_avg_diff.pt")
    assert torch.equal(import_pt(pt, num_layers=3, hidden=64), vector)
    with pytest.raises(
        VectorFileError, match=r"has shape \[4, 64\] but the model needs \[31, 576\]"
    ):
        import_pt(pt, num_layers=30, hidden=576)


def test_pickled_pt_files_are_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"vector": Evil()}, path)
    with pytest.raises(VectorFileError, match="weights_only refused it"):
        import_pt(path)


def test_analysis_reports_eval_separation(generated: Path) -> None:
    with Store(generated) as store:
        extract(store, "paternalism")
        report = analyze(store, "paternalism")
    assert report.eval_counts == (40, 40)
    assert len(report.separation) == 4 and 1 <= report.recommended_layer <= 3
    assert all(0 <= s.auroc <= 1 for s in report.separation)
    assert set(report.norms) == {"response_avg_diff", "prompt_avg_diff", "prompt_last_diff"}


def test_bad_inputs(generated: Path) -> None:
    with Store(generated) as store:
        with pytest.raises(PersonaError, match="--threshold must be between 0 and 100"):
            find_pairs(store, "paternalism", threshold=120)
        with pytest.raises(PersonaError, match="no effective pairs"):
            extract(store, "paternalism", threshold=99)
        with pytest.raises(PersonaError, match="has no pos or neg generation job"):
            find_pairs(store, "deception")
        with pytest.raises(PersonaError, match="--source must be"):
            extract(store, "paternalism", source="magic")


@pytest.mark.parametrize(("threshold", "coherence"), [(50, 50), (85, 50), (0, 95), (25, 0)])
def test_sql_pairs_follow_the_same_rule_as_the_filter(
    generated: Path, threshold: float, coherence: float
) -> None:
    """The review screen's SQL and ``pipeline.filter`` must give every pair the same reason,
    overrides included."""
    from db.store import PairQuery

    with Store(generated) as store:
        pairs = find_pairs(store, "paternalism", threshold=threshold, coherence=coherence)
        first, second = pairs.pairs[0].key, pairs.pairs[5].key
        store.set_override("paternalism", first, True)
        store.set_override("paternalism", second, False)
        try:
            expected = {
                p.key: p.reason
                for p in find_pairs(
                    store, "paternalism", threshold=threshold, coherence=coherence
                ).pairs
            }
            query = PairQuery(
                "paternalism", pairs.pos_job, pairs.neg_job, pairs.judge, threshold, coherence
            )
            rows = store.pair_rows(query, limit=1000)
            got = {(r["question"], r["instruction"], r["sample"]): r["reason"] for r in rows}
            counts = store.pair_reason_counts(query)
            effective = store.pair_rows(
                PairQuery(**{**query.__dict__, "status": "effective"}), limit=1000
            )
        finally:
            store.set_override("paternalism", first, None)
            store.set_override("paternalism", second, None)
    assert got == expected
    assert counts == dict(Counter(expected.values()))
    assert len(effective) == sum(r in ("effective", "included by hand") for r in got.values())


def test_empty_answers_are_left_out_of_the_response_mean(
    generated: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """An empty answer has no response mean: response_avg_diff averages the answers that
    exist (with a warning saying so); the prompt kinds keep every pair."""
    import json
    import sqlite3

    from pipeline.extract import side_sums

    db = tmp_path / "empty.db"
    with sqlite3.connect(generated) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with Store(db) as store:
        pairs = find_pairs(store, "paternalism")
        emptied = pairs.effective[0].pos_id
        store.db.execute(
            "update responses set answer_ids = ?, answer = '' where id = ?",
            [json.dumps([]), emptied],
        )
        store.db.conn.commit()
        result = extract(store, "paternalism", source="forward")
        pos = store.responses_by_id([p.pos_id for p in pairs.effective])
        neg = store.responses_by_id([p.neg_id for p in pairs.effective])
        forward = ForwardMeans(load_model(str(tiny_model_dir)))
        kept = [r for r in pos if r.answer_ids]
        assert len(kept) == len(pos) - 1
        pos_kept = side_sums(kept, captured=None, forward=forward)["response_avg"] / len(kept)
        neg_all = side_sums(neg, captured=None, forward=forward)["response_avg"] / len(neg)
    torch.testing.assert_close(
        result.vectors["response_avg_diff"], pos_kept - neg_all, rtol=1e-4, atol=1e-5
    )
    assert any("1 effective answers are empty (pos 1, neg 0)" in w for w in result.warnings)


def test_a_side_of_only_empty_answers_is_refused(generated: Path, tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "all-empty.db"
    with sqlite3.connect(generated) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with Store(db) as store:
        store.db.execute("update responses set answer_ids = '[]', answer = '' where side = 'neg'")
        store.db.conn.commit()
        with pytest.raises(PersonaError, match="every neg answer among the 38 effective pairs"):
            extract(store, "paternalism", source="forward")


def test_original_format_export_follows_the_hf_convention_at_every_row(
    generated: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Rows 0..L-1 are the native vector's; row L is the difference of the means of HF's own
    hidden_states[L] (final norm applied), as the original project's files hold, computed
    here independently with output_hidden_states over each effective pair's tokens."""
    from pipeline.chat import token_ids
    from pipeline.extract import original_format_vectors
    from tui.cli import main

    with Store(generated) as store:
        native = extract(store, "paternalism", threshold=40, coherence=60).vectors
        exported = original_format_vectors(store, "paternalism")
        pairs = find_pairs(store, "paternalism", threshold=40, coherence=60)
        pos = store.responses_by_id([p.pos_id for p in pairs.effective])
        neg = store.responses_by_id([p.neg_id for p in pairs.effective])
    loaded = load_model(str(tiny_model_dir))

    def final_means(rows) -> dict[str, torch.Tensor]:
        sums = {"response_avg": 0, "prompt_avg": 0, "prompt_last": 0}
        for r in rows:
            prompt, answer = token_ids(r, loaded)
            with torch.inference_mode():
                out = loaded.model(torch.tensor([prompt + answer]), output_hidden_states=True)
            h = out.hidden_states[-1][0]  # HF: the final norm applied
            n = len(prompt)
            sums["response_avg"] += h[n:].mean(0)
            sums["prompt_avg"] += h[:n].mean(0)
            sums["prompt_last"] += h[n - 1]
        return {k: v / len(rows) for k, v in sums.items()}

    pos_final, neg_final = final_means(pos), final_means(neg)
    for mean_kind in ("response_avg", "prompt_avg", "prompt_last"):
        kind = f"{mean_kind}_diff"
        assert torch.equal(exported[kind][:-1], native[kind][:-1])
        torch.testing.assert_close(
            exported[kind][-1], pos_final[mean_kind] - neg_final[mean_kind], rtol=1e-4, atol=1e-5
        )
        assert not torch.allclose(exported[kind][-1], native[kind][-1])  # the raw output differs
    out = tmp_path / "pv"
    assert (
        main(["--db", str(generated), "vectors", "export", "paternalism", "--out", str(out)]) == 0
    )
    written = import_pt(out / "paternalism_response_avg_diff.pt")
    torch.testing.assert_close(written, exported["response_avg_diff"])


def test_vectors_show_names_the_steering_layer_of_a_finished_sweep(
    generated: Path, tmp_path: Path, capsys
) -> None:
    """The recommended layer reads the eval AUROC; the steering layer, where a sweep has
    run, is the sweep's best raising setting at coherence >= 50."""
    import shutil
    import sqlite3

    from tui.cli import main

    db = tmp_path / "sweep.db"
    with sqlite3.connect(generated) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    shutil.copytree(generated.parent / "persona.data", tmp_path / "sweep.data")
    with Store(db) as store:
        extract(store, "paternalism")
        best = {
            "baseline": {"layer": 0, "coef": 0.0, "trait": 20.0, "coherence": 80.0},
            "up": {"layer": 2, "coef": 4.0, "trait": 71.5, "coherence": 66.0},
            "down": None,
        }
        job = store.create_job("sweep", "paternalism", {"layers": [1, 2], "model": None})
        store.update_job(job.id, status="done", stats={"best": best})
        report = analyze(store, "paternalism")
    assert report.steering is not None and report.steering["layer"] == 2
    assert main(["--db", str(db), "vectors", "show", "paternalism"]) == 0
    assert (
        f"steering layer 2 from sweep job {job.id}: coef +4 raised the trait to 71.5 "
        "(unsteered 20.0) at mean coherence 66.0" in capsys.readouterr().out
    )
