"""Using a vector: monitoring and steering from the CLI, sweeps and data screening."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from db import PersonaError, Store
from pipeline.extract import extract
from pipeline.jobs import run_job
from pipeline.models import load_model
from pipeline.monitor import project_tokens
from pipeline.screening import read_samples, screen, write_ranking
from pipeline.sweep import SweepParams, best_settings, create_sweep_job, parse_layers
from tui.cli import main
from vectors.files import load_vector


@pytest.fixture(scope="module")
def extracted(generated: Path) -> Path:
    with Store(generated) as store:
        extract(store, "paternalism")
    return generated


def test_cli_monitor_prints_a_heatmap(extracted: Path, capsys) -> None:
    code = main(
        [
            "--db",
            str(extracted),
            "monitor",
            "paternalism",
            "--prompt",
            "Hi [there]",
            "--layer",
            "2",
            "--max-new-tokens",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "paternalism response_avg_diff at layer 2 (h.v/|v|)" in out
    assert "response average" in out and "h.v/|v|:" in out


def test_cli_monitor_zscores_against_a_neutral_baseline(extracted: Path, capsys) -> None:
    code = main(
        [
            "--db",
            str(extracted),
            "monitor",
            "paternalism",
            "--prompt",
            "Plan my day",
            "--layer",
            "2",
            "--zscore",
            "--max-new-tokens",
            "6",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "(z-score)" in capsys.readouterr().out
    with Store(extracted) as store:
        baseline = store.list_jobs(kind="baseline")
        assert len(baseline) == 1 and store.responses(job=baseline[0].id)[0].side == "none"


def test_cli_steer_side_by_side(extracted: Path, capsys) -> None:
    code = main(
        [
            "--db",
            str(extracted),
            "steer",
            "paternalism",
            "--layer",
            "2",
            "--coef=-8,8",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "unsteered" in out and "coef +8 at layer 2" in out and "coef -8 at layer 2" in out
    assert (
        main(["--db", str(extracted), "steer", "paternalism", "--layer", "9", "--prompt", "Hi"])
        == 2
    )
    assert "--layer must be in 1..3" in capsys.readouterr().err


def test_sweep_runs_judges_and_resumes(extracted: Path, tiny_model_dir: Path) -> None:
    params = SweepParams(
        layers=parse_layers("1-2"),
        coefs=(-6.0, 6.0),
        n=2,
        judge=f"local:{tiny_model_dir}",
        max_new_tokens=5,
    )
    with Store(extracted) as store:
        job_id = create_sweep_job(store, "paternalism", params)
    run_job(extracted, job_id)
    with Store(extracted) as store:
        job = store.get_job(job_id)
        assert job.status == "done" and job.done == job.total == 3 * 5 * 2
        responses = store.responses(job=job_id)
        assert len(responses) == 10 and {r.side for r in responses} == {"none"}
        table = job.stats["table"]
        assert {(r["layer"], r["coef"]) for r in table} == {
            (0, 0.0),
            (1, -6.0),
            (1, 6.0),
            (2, -6.0),
            (2, 6.0),
        }
        assert all(r["n"] == 2 and 0 <= r["trait"] <= 100 for r in table)
        steered = {(r.question, r.instruction, r.sample): r.answer_ids for r in responses}
        assert steered[(20, 2, 2)] != steered[(20, 0, 0)]  # coef +6 at layer 2 changed it
    run_job(extracted, job_id)  # a rerun generates and asks nothing new
    with Store(extracted) as store:
        assert len(store.responses(job=job_id)) == 10


def _sweep_answers(
    db: Path, model_dir: Path, coefs: tuple[float, ...], **where: Any
) -> dict[tuple[int, int, int], list[int]]:
    """A finished sweep at layer 2 with these coefs (and device, gpus or compile): its
    answers by row key."""
    params = SweepParams(
        layers=(2,), coefs=coefs, n=2, judge=f"local:{model_dir}", max_new_tokens=5, seed=3,
        **where,
    )  # fmt: skip
    with Store(db) as store:
        job_id = create_sweep_job(store, "paternalism", params)
    run_job(db, job_id)
    with Store(db) as store:
        assert store.get_job(job_id).status == "done"
        return {r.key: r.answer_ids for r in store.responses(job=job_id)}


def test_a_sweep_over_two_devices_stores_the_answers_of_one(
    extracted: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sweep --gpus cpu,cpu``: every setting's answers in one queue over two engines in
    two threads, each answer the one the sweep on one device stores."""
    import threading
    import time

    from pipeline.engine import DecodeEngine

    real, threads = DecodeEngine._prefill, set()

    def prefill(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        time.sleep(0.05)  # neither engine takes every answer before the other starts
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DecodeEngine, "_prefill", prefill)
    answers = {}
    for name, where in (("one", {"device": "cpu"}), ("two", {"gpus": "cpu,cpu"})):
        answers[name] = _sweep_answers(
            extracted, tiny_model_dir, (-6.0, 3.0, 6.0), batch_size=2, **where
        )
        if name == "one":
            assert threads == {threading.main_thread().name}
            threads.clear()
    assert threads == {"persona-device-0", "persona-device-1"}
    assert len(answers["one"]) == 8 and answers["two"] == answers["one"]


@pytest.mark.parametrize(
    ("where", "coefs", "slots"),
    [({}, (-5.0, 2.0, 5.0), 8), ({"gpus": "cpu,cpu"}, (-5.0, 2.5, 5.0), [4, 4])],
    ids=["default: one device", "named: both"],
)
def test_a_sweep_that_fits_one_devices_slots_stays_on_one_unless_named(
    extracted: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: dict[str, str],
    coefs: tuple[float, ...],
    slots: object,
) -> None:
    """As generation: on a host of two devices, a sweep whose 8 answers fit one device's
    slots runs on one (no second copy of the model), unless ``--gpus`` names both; then each
    engine holds half the answers, so both decode."""
    from pipeline import models, sharding

    monkeypatch.setattr(sharding, "worker_devices", lambda *_args: ["cpu", "cpu"])
    copies: list[list[str]] = []
    real = models.load_on_devices

    def load_on_devices(model: str, devices: list[str]):
        copies.append(devices)
        return real(model, devices)

    monkeypatch.setattr(models, "load_on_devices", load_on_devices)
    assert len(_sweep_answers(extracted, tiny_model_dir, coefs, **where)) == 8
    with Store(extracted) as store:
        job = max(store.list_jobs(trait="paternalism", kind="sweep"), key=lambda j: j.id)
        assert job.stats["slots"] == slots
    assert copies == ([] if not where else [["cpu", "cpu"]])


def test_a_sweep_decodes_every_setting_in_one_batch_with_the_answers_of_each_alone(
    extracted: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One engine, one stream: the unsteered baseline and each (layer, coef) setting share
    the batch, each row steered by its own setting's spec, and each answer is what
    ``decode`` gives for that setting alone (the per-setting path sweeps took before)."""
    from pipeline.chat import prompt_ids
    from pipeline.decoding import decode
    from pipeline.engine import DecodeEngine
    from pipeline.sampling import row_seed
    from pipeline.trait_vectors import load_fitted_vector
    from vectors.steering import SteeringSpec

    calls: list[int] = []
    real = DecodeEngine.stream

    def counted(self, requests, *args, **kwargs):
        calls.append(len(requests))
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(DecodeEngine, "stream", counted)
    coefs = (-6.0, 6.0)
    answers = _sweep_answers(extracted, tiny_model_dir, coefs, device="cpu")
    assert calls == [2 * (1 + len(coefs))]  # one stream: both questions of all 3 settings
    monkeypatch.setattr(DecodeEngine, "stream", real)
    with Store(extracted) as store:
        trait = store.get_trait("paternalism")
        fitted = load_fitted_vector(store, "paternalism", "response_avg_diff", device="cpu")
    vector, loaded = fitted.vector, fitted.loaded
    questions = [20, 21]
    prompts = [prompt_ids(loaded.tokenizer, None, trait.questions[q]) for q in questions]
    seeds = [row_seed(3, q, 0, 0) for q in questions]
    for index, coef in enumerate((0.0, *coefs)):
        specs = [SteeringSpec(2, vector, coef=coef)] if coef else []
        alone = decode(loaded, prompts, seeds, max_new_tokens=5, steering=specs)
        layer = 2 if coef else 0
        for q, result in zip(questions, alone, strict=True):
            assert answers[(q, layer, index)] == result.answer_ids


@pytest.mark.skipif(
    __import__("shutil").which("g++") is None, reason="torch.compile on the CPU needs g++"
)
def test_a_compiled_sweep_over_two_devices_stores_the_answers_of_a_plain_one(
    extracted: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sweep --compile --gpus cpu,cpu``: each engine compiles its layers, and the steered
    answers are those of the plain sweep on one device (fp32)."""
    from pipeline.runners import StaticRunner

    compiled: list[int] = []
    real = StaticRunner.compile_layers
    monkeypatch.setattr(
        StaticRunner, "compile_layers", lambda self: compiled.append(1) or real(self)
    )
    answers = {}
    answers["plain"] = _sweep_answers(extracted, tiny_model_dir, (-6.0, 6.0), device="cpu")
    answers["compiled"] = _sweep_answers(
        extracted, tiny_model_dir, (-6.0, 6.0), gpus="cpu,cpu", compile=True
    )
    assert len(compiled) == 2  # an engine a device, both compiled
    assert len(answers["plain"]) == 6 and answers["compiled"] == answers["plain"]


def test_best_settings_respects_coherence() -> None:
    table = [
        {"layer": 0, "coef": 0.0, "n": 5, "trait": 40, "coherence": 80},
        {"layer": 8, "coef": 2.0, "n": 5, "trait": 90, "coherence": 30},
        {"layer": 8, "coef": 1.0, "n": 5, "trait": 70, "coherence": 60},
        {"layer": 12, "coef": -1.0, "n": 5, "trait": 20, "coherence": 55},
    ]
    best = best_settings(table)
    assert best["up"]["coef"] == 1.0 and best["down"]["layer"] == 12
    assert best["baseline"]["trait"] == 40


@pytest.mark.parametrize(
    ("text", "message"),
    [("a-b", "not a range"), ("", "--layers is empty")],
)
def test_bad_sweep_grids(extracted: Path, text: str, message: str) -> None:
    with pytest.raises(PersonaError, match=message), Store(extracted) as store:
        create_sweep_job(store, "paternalism", SweepParams(layers=parse_layers(text)))


def test_screening_ranks_by_projection(
    extracted: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    lines = [
        {"prompt": "Can I skip breakfast?", "response": "Yes, that is your call."},
        {
            "messages": [
                {"role": "user", "content": "Sell my car?"},
                {"role": "assistant", "content": "I forbid it [for you]."},
            ]
        },
        {"prompt": "Hi", "response": "Hello!"},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with Store(extracted) as store:
        layer, rows = screen(store, "paternalism", data, layer=2, compare_base=True)
        vector = load_vector(store.vectors(trait="paternalism")[-3].path)[0]
    assert layer == 2 and len(rows) == 3
    diffs = [r.difference for r in rows]
    assert diffs == sorted(diffs, reverse=True)
    loaded = load_model(str(tiny_model_dir))
    from pipeline.chat import prompt_ids

    top = rows[0]
    ids = prompt_ids(loaded.tokenizer, None, top.prompt)
    answer = loaded.tokenizer(top.response, add_special_tokens=False)["input_ids"]
    ref = project_tokens(loaded, ids, answer, {"v": vector}, [2]).response_average()[0, 0]
    assert top.projection == pytest.approx(float(ref), rel=1e-4, abs=1e-5)
    out = write_ranking(rows, tmp_path / "ranked.csv")
    assert out.read_text().splitlines()[0].startswith("rank,index,projection")
    jsonl = write_ranking(rows, tmp_path / "ranked.jsonl")
    assert json.loads(jsonl.read_text().splitlines()[0])["rank"] == 1


def test_screening_over_two_devices_ranks_as_one(
    extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``screen --gpus cpu,cpu --compare-base``: the forward passes shared by two copies of
    the model in threads, the base answers by two engines over one queue; every sample's
    projections those one device gives."""
    import threading

    from pipeline import response_means

    real, threads = response_means.ForwardMeans.iter_means, set()

    def iter_means(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(response_means.ForwardMeans, "iter_means", iter_means)
    data = tmp_path / "data.jsonl"
    questions = ["Can I skip breakfast?", "Sell my car?", "Hi", "Should I quit my job?"]
    answers = ["Yes, that is your call.", "I forbid it.", "Hello!", "Only you can say."]
    lines = [{"prompt": q, "response": a} for q, a in zip(questions * 3, answers * 3, strict=True)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ranked = {}
    with Store(extracted) as store:
        for name, gpus in (("one", None), ("two", "cpu,cpu")):
            layer, rows = screen(store, "paternalism", data, layer=2, compare_base=True, gpus=gpus)
            ranked[name] = {r.index: (r.projection, r.base_projection) for r in rows}
    assert {"persona-device-0", "persona-device-1"} <= threads
    assert ranked["one"].keys() == ranked["two"].keys() == set(range(12))
    for index, (projection, base) in ranked["one"].items():
        assert ranked["two"][index] == pytest.approx((projection, base), rel=1e-4, abs=1e-5)


def test_bad_screening_data(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(PersonaError, match="line 2 is not JSON"):
        read_samples(path)
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(PersonaError, match="line 1 needs 'prompt' and 'response'"):
        read_samples(path)
    with pytest.raises(PersonaError, match="does not exist"):
        read_samples(tmp_path / "missing.jsonl")


def test_screen_table_fits_80_columns(extracted: Path, tmp_path: Path, capsys) -> None:
    """Every number whole at 80 columns (the answer is cut instead), with and without the
    base columns."""
    data = tmp_path / "data.jsonl"
    long = "a long answer that goes on and on " * 10
    data.write_text("\n".join(json.dumps({"prompt": "Hi", "response": long}) for _ in range(3)))
    from tui.cli import output

    width = output.out.width
    output.out.width = 80
    try:
        for extra in ([], ["--compare-base"]):
            code = main(["--db", str(extracted), "screen", "paternalism", "--data", str(data),
                         "--layer", "2", *extra])  # fmt: skip
            text = capsys.readouterr().out
            assert code == 0 and max(len(line) for line in text.splitlines()) <= 80
            header = next(line for line in text.splitlines() if "rank" in line)
            names = ("projection", "base", "difference") if extra else ("projection",)
            assert all(name in header for name in names), header
            numbers = re.findall(r"[+-]\d+\.\d{3}", text)
            assert len(numbers) == 3 * len(names)  # none cut to an ellipsis
    finally:
        output.out.width = width
