"""One home per parameter: each step's dataclass owns its default and its check, and every
entry point (the command line, ``run``, the dashboard's inputs) refuses the same values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from db import PersonaError, Store
from pipeline.filter import DEFAULT_FILTER, FilterParams
from pipeline.run import RunParams, run_trait
from pipeline.sweep import DEFAULT_COEFS, SweepParams, check_coefs, format_coefs, parse_coefs
from tui.validators import FilterValue

NOT_FINITE = (math.nan, math.inf, -math.inf)


@pytest.mark.parametrize("value", [*NOT_FINITE, -0.5, 100.5])
@pytest.mark.parametrize("field", ["threshold", "coherence"])
def test_the_rule_refuses_thresholds_outside_0_100(field: str, value: float) -> None:
    with pytest.raises(PersonaError, match=f"--{field} must be between 0 and 100"):
        FilterParams(**{field: value}).validate()
    assert not FilterValue(field).validate(str(value)).is_valid


@pytest.mark.parametrize("value", [0.0, 37.5, 100.0])
def test_the_rule_takes_the_ends_of_the_scale(value: float) -> None:
    assert FilterParams(value, value).validate() == FilterParams(value, value)
    assert FilterValue("threshold").validate(f"{value:g}").is_valid


def test_run_refuses_a_bad_threshold_before_any_job(db_path: Path) -> None:
    params = RunParams(trait="paternalism", judge="local:smollm2", coherence=math.nan)
    with pytest.raises(PersonaError, match="--coherence must be between 0 and 100"):
        run_trait(db_path, params)
    with Store(db_path) as store:
        assert store.list_jobs() == []
    assert RunParams(trait="x").threshold == DEFAULT_FILTER.threshold


@pytest.mark.parametrize("coefs", [(math.nan,), (1.0, math.inf), (-math.inf,), (2e4,)])
def test_steering_coefficients_must_be_finite(coefs: tuple[float, ...]) -> None:
    with pytest.raises(PersonaError, match="finite numbers"):
        check_coefs(coefs)
    with pytest.raises(PersonaError, match="finite numbers"):
        SweepParams(layers=(1,), coefs=coefs, judge="local:smollm2").validate()
    with pytest.raises(PersonaError, match="finite numbers"):
        parse_coefs(",".join(str(c) for c in coefs))


def test_the_default_grid_reads_back_as_itself() -> None:
    assert parse_coefs(format_coefs(DEFAULT_COEFS)) == DEFAULT_COEFS == SweepParams((1,)).coefs


@pytest.mark.parametrize("author", [None, "local:smollm2", "nokind"])
@pytest.mark.parametrize("authoring", ["fails", "succeeds"])
def test_run_authors_a_new_trait_while_the_generation_model_loads(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, author: str | None, authoring: str
) -> None:
    """The generation model starts loading (on the device generation takes first) once the
    author job is made, before an API author writes the trait; whatever fails after that
    (the authoring, a later step) waits for that load before it raises. A local author loads
    its own model: nothing loads beside it. A bad author spec is refused before any load."""
    import pipeline.models
    import pipeline.run

    events: list = []

    class Loading:
        def join(self) -> None:
            events.append("joined")

    def start(spec: str, device: str | None) -> Loading:
        events.append(("load", spec, device))
        return Loading()

    class Failed(Exception):
        pass

    def author_job(_db_path, _job_id, on_progress=None) -> None:
        events.append("author")
        if authoring == "fails":
            raise Failed

    def generation(*_args, **_kwargs) -> None:
        events.append("generation")
        raise Failed

    monkeypatch.setattr(pipeline.models, "load_in_background", start)
    monkeypatch.setattr(pipeline.run, "run_job", author_job)
    monkeypatch.setattr(pipeline.run, "run_generation_jobs", generation)
    monkeypatch.setattr(pipeline.run, "find_or_create_job", lambda *_args: 1)
    params = RunParams(
        trait="brand_new", description="Says so.", author=author, model="m", gpus="1,0",
        judge="local:smollm2",
    )  # fmt: skip
    if author == "nokind":
        with pytest.raises(PersonaError, match="nokind"):
            run_trait(db_path, params)
        assert events == []
        return
    with pytest.raises(Failed):
        run_trait(db_path, params)
    then = ["joined"] if authoring == "fails" else ["generation", "joined"]
    if author is None:
        assert events == [("load", "m", "cuda:1"), "author", *then]
    else:
        assert events == ["author", *then[:-1]]
