"""Jobs: every job, newest first, with what it covers (side, split, scope) and its status in
columns sized to the terminal; the selected job's progress pane and worker log; keys to
start generation, judging, extraction and sweeps as detached workers, cancel and resume."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.events import Resize
from textual.widgets import DataTable, Footer, Header

from db import PersonaError, Store
from pipeline import job_processes
from pipeline.filter import DEFAULT_FILTER
from pipeline.gpu_status import gpu_status
from tui.messages import JobsLoaded
from tui.screens.base import PersonaScreen
from tui.screens.form import Field, FormModal
from tui.widgets.gpu_pane import GpuPane
from tui.widgets.job_pane import JobPane, job_scope

POLL_SECONDS = 1.0
COLUMNS = ("id", "kind", "side", "split", "scope", "trait", "status", "progress", "message")
# Columns that give up width when the terminal is narrow, and the least each keeps.
SHRINKING = {"message": 7, "scope": 10, "trait": 6}
LABELS = {"progress": "done"}
CELL_PADDING = 2  # DataTable's cell_padding on both sides


def column_widths(rows: list[dict[str, str]], width: int) -> dict[str, int]:
    """Each column as wide as its widest cell or its label; when that is wider than
    ``width``, the message, then the scope, then the trait column give up the difference
    (down to their minimum); any width left over goes to the message."""
    widths = {c: max([len(LABELS.get(c, c)), *(len(row[c]) for row in rows)]) for c in COLUMNS}
    room = width - CELL_PADDING * len(COLUMNS) - 2  # the scrollbar
    over = sum(widths.values()) - room
    for column, least in SHRINKING.items():
        if over <= 0:
            break
        cut = min(over, max(widths[column] - least, 0))
        widths[column] -= cut
        over -= cut
    if over < 0:
        widths["message"] += -over
    return widths


def job_cells(job: Any) -> dict[str, str]:
    progress = f"{100 * job.done // job.total}%" if job.total else ""
    return {
        "id": str(job.id),
        "kind": job.kind,
        **job_scope(job),
        "trait": job.trait or "",
        "status": job.status,
        "progress": progress,
        "message": job.message.splitlines()[0] if job.message else "",
    }


class JobsScreen(PersonaScreen):
    TITLE = "Jobs"
    BINDINGS = [
        Binding("g", "generate", "Generate"),
        Binding("J", "judge", "Judge"),
        Binding("x", "extract", "Extract"),
        Binding("w", "sweep", "Sweep"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "resume", "Resume"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="jobs-table", cursor_type="row")
        yield JobPane(id="job-pane")
        yield GpuPane("", id="gpu-pane", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}  # by job id, newest first, as shown
        self.widths: dict[str, int] = {}
        self.jobs_by_id: dict[int, Any] = {}
        self.query_one(DataTable).focus()
        self.poll()
        self.set_interval(POLL_SECONDS, self.poll)

    def on_resize(self, _event: Resize) -> None:
        self.show_rows(self.rows, force=True)  # the widths follow the terminal

    def selected_job(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    # ---- polling ---------------------------------------------------------------------------
    def poll(self) -> None:
        self.load_jobs(self.selected_job())

    @work(thread=True, exclusive=True, group="jobs-poll", exit_on_error=False, name="Read jobs")
    def load_jobs(self, selected: int | None) -> None:
        with Store(self.db_path) as store:
            jobs = job_processes.current_jobs(store)
            if selected is None and jobs:
                selected = jobs[-1].id
            log = job_processes.tail_log(store, selected) if selected is not None else []
            path = job_processes.log_path(store, selected) if selected is not None else None
            log_file = str(path) if path is not None and path.exists() else ""
            gpus = gpu_status(store)
        self.post_message(JobsLoaded(jobs, selected, log, log_file, gpus))

    def on_jobs_loaded(self, message: JobsLoaded) -> None:
        pane = self.query_one(JobPane)
        self.jobs_by_id = {job.id: job for job in message.jobs}
        for job in message.jobs:
            pane.record(job)
        self.show_rows({str(job.id): job_cells(job) for job in reversed(message.jobs)})
        pane.show(self.jobs_by_id.get(message.selected), message.log, message.log_file)
        if message.gpus is not None:
            self.query_one(GpuPane).show(message.gpus)

    def show_rows(self, rows: dict[str, dict[str, str]], force: bool = False) -> None:
        """Rows newest first. Cells change in place; a new or gone job, or new column widths,
        rebuild the table (the cursor stays on its job)."""
        table = self.query_one(DataTable)
        widths = column_widths(list(rows.values()), self.app.size.width)
        same_rows = list(rows) == [key.value for key in table.rows]
        if same_rows and widths == self.widths and not force:
            with self.app.batch_update():
                for key, cells in rows.items():
                    for column, value in cells.items():
                        if self.rows[key][column] != value:
                            table.update_cell(key, column, value)
            self.rows = rows
            return
        selected = self.selected_job()
        with self.app.batch_update():
            table.clear(columns=True)
            for column in COLUMNS:
                table.add_column(LABELS.get(column, column), key=column, width=widths[column])
            for key, cells in rows.items():
                table.add_row(*(cells[c] for c in COLUMNS), key=key)
            if selected is not None and str(selected) in rows:
                table.move_cursor(row=table.get_row_index(str(selected)), animate=False)
        self.rows, self.widths = rows, widths

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.poll()

    # ---- starting jobs ---------------------------------------------------------------------
    def _trait(self) -> str:
        trait = getattr(self.app, "trait", None)
        if not trait:
            raise PersonaError("select a trait first: press 1, pick one, press enter")
        return trait

    def _ask(self, title: str, fields: list[Field], start) -> None:
        try:
            trait = self._trait()
        except PersonaError as exc:
            self.app.show_error("no trait selected", str(exc))
            return

        def submitted(values: dict[str, str] | None) -> None:
            if values is not None:
                self.launch(start, trait, values)

        self.app.push_screen(FormModal(f"{title}: {trait}", fields), submitted)

    @work(thread=True, group="jobs-start", exit_on_error=False, name="Start the job")
    def launch(self, start, trait: str, values: dict[str, str]) -> None:
        with Store(self.db_path) as store:
            job_processes.start_jobs(store, start(store, trait, values))
        self.app.call_from_thread(self.poll)

    def action_generate(self) -> None:
        self._ask(
            "Generate",
            [
                Field("side", "side", "both", ("both", "pos", "neg")),
                Field("split", "split", "extract", ("extract", "eval")),
                Field("model", "model", "smollm2"),
                Field("n", "answers per question", "10"),
                Field("max_new_tokens", "max new tokens", "1000"),
                Field("batch_size", "batch size (blank: auto)", ""),
                Field("temperature", "temperature", "1.0"),
                Field("seed", "seed", "0"),
                *_engine_fields(),
            ],
            start_generation,
        )

    def action_judge(self) -> None:
        from pipeline.judging import DEFAULT_JUDGE

        self._ask(
            "Judge",
            [
                Field("judge", "judge (openai:M, anthropic:M, local:M)", DEFAULT_JUDGE),
                Field("metrics", "metrics", "trait,coherence"),
                Field("max_concurrent", "max in flight", "50"),
                Field("processes", "client processes (API judges; blank: auto)", ""),
                Field("base_url", "base URL (optional)", ""),
                _gpus_field("GPUs for a local: judge (0,1 or cpu; blank: all visible)"),
            ],
            start_judging,
        )

    def action_extract(self) -> None:
        default = (DEFAULT_FILTER.threshold, DEFAULT_FILTER.coherence)
        threshold, coherence = getattr(self.app, "thresholds", default)
        self._ask(
            "Extract",
            [
                Field("threshold", "trait threshold T", f"{threshold:g}"),
                Field("coherence", "coherence threshold C", f"{coherence:g}"),
                Field("source", "activations", "auto", ("auto", "captured", "forward")),
                _gpus_field("GPUs for a forward pass (0,1 or cpu; blank: all visible)"),
            ],
            start_extraction,
        )

    def action_sweep(self) -> None:
        from pipeline.judging import DEFAULT_JUDGE
        from pipeline.sweep import DEFAULT_COEFS, SweepParams, format_coefs

        self._ask(
            "Sweep",
            [
                Field("layers", "layers (8-24, 8-24:4 or 8,12)", "8-24:4"),
                Field("coefs", "coefficients", format_coefs(DEFAULT_COEFS)),
                Field("n", "eval questions", str(SweepParams.n)),
                Field("judge", "judge", DEFAULT_JUDGE),
                Field("batch_size", "batch size (blank: auto)", ""),
                *_engine_fields(),
            ],
            start_sweep,
        )

    def action_cancel(self) -> None:
        job_id = self.selected_job()
        if job_id is not None:
            self.job_control(job_id, "cancel")

    def action_resume(self) -> None:
        job_id = self.selected_job()
        if job_id is not None:
            self.job_control(job_id, "resume")

    @work(thread=True, group="jobs-control", exit_on_error=False, name="Cancel or resume")
    def job_control(self, job_id: int, what: str) -> None:
        """A job that cannot be cancelled or resumed (it is done, or already running) is
        said in a one-line notice: a key pressed on the wrong row is no error."""
        try:
            with Store(self.db_path) as store:
                if what == "cancel":
                    mates = job_processes.cancel(store, job_id)
                    done = job_processes.cancel_notice(job_id, mates)
                else:
                    job_processes.start_worker(store, job_id, rerun_done=False)
                    done = f"job {job_id} resumed"
        except PersonaError as exc:
            self.app.call_from_thread(self.notify, str(exc), severity="warning", timeout=5)
        else:
            self.app.call_from_thread(self.notify, done, timeout=4)
        self.app.call_from_thread(self.poll)


# ---- forms to jobs: the same pipeline calls as the CLI ------------------------------------------
def _int(values: dict[str, str], key: str) -> int | None:
    text = values.get(key, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise PersonaError(
            f"{key.replace('_', ' ')} must be a whole number, not '{text}'"
        ) from None


def _float(values: dict[str, str], key: str) -> float:
    try:
        return float(values[key])
    except ValueError:
        raise PersonaError(f"{key} must be a number, not '{values[key]}'") from None


def _gpus_field(label: str = "GPUs (0,1 or cpu; blank: all visible)") -> Field:
    """``--gpus``: the devices a step's model copies run on."""
    return Field("gpus", label, "")


def _engine_fields() -> list[Field]:
    """Where and how the local engine runs (``--gpus``, ``--compile``, ``--deterministic``),
    as the command line offers them for ``generate`` and ``sweep``."""
    return [
        _gpus_field(),
        Field("compile", "compile the decode step (large jobs)", "no", ("no", "yes")),
        Field("deterministic", "GPU runs repeat (slower)", "no", ("no", "yes")),
    ]


def _engine_values(values: dict[str, str]) -> dict[str, Any]:
    """The engine fields as step parameters (their validation stays in the step's
    dataclass)."""
    return {
        "gpus": values.get("gpus") or None,
        "compile": values.get("compile") == "yes",
        "deterministic": values.get("deterministic") == "yes",
    }


def start_generation(store: Store, trait: str, values: dict[str, str]) -> list[int]:
    from pipeline.generate import GenerateParams, find_or_create_job

    sides = ["pos", "neg"] if values["side"] == "both" else [values["side"]]
    return [
        find_or_create_job(
            store,
            trait,
            GenerateParams(
                side=side,
                split=values["split"],
                model=values["model"],
                n_per_question=_int(values, "n") or 0,
                max_new_tokens=_int(values, "max_new_tokens") or 0,
                batch_size=_int(values, "batch_size"),
                temperature=_float(values, "temperature"),
                seed=_int(values, "seed") or 0,
                **_engine_values(values),
            ).validate(),
        )
        for side in sides
    ]


def start_judging(store: Store, trait: str, values: dict[str, str]) -> list[int]:
    from pipeline.judging import JudgeParams, find_or_create_judge_job

    params = JudgeParams(
        judge=values["judge"],
        metrics=tuple(m.strip() for m in values["metrics"].split(",") if m.strip()),
        max_concurrent=_int(values, "max_concurrent") or 0,
        processes=_int(values, "processes"),
        base_url=values["base_url"] or None,
        gpus=values.get("gpus") or None,
    )
    return [find_or_create_judge_job(store, trait, params)]


def start_extraction(store: Store, trait: str, values: dict[str, str]) -> list[int]:
    from pipeline.filter import check_thresholds
    from pipeline.sharding import parse_gpus

    threshold, coherence = _float(values, "threshold"), _float(values, "coherence")
    check_thresholds(threshold, coherence)
    gpus = parse_gpus(values.get("gpus") or None)  # refused here, before a job row
    params = {"threshold": threshold, "coherence": coherence, "source": values["source"]}
    return [store.create_job("extract", trait, {**params, "gpus": gpus}).id]


def start_sweep(store: Store, trait: str, values: dict[str, str]) -> list[int]:
    from pipeline.sweep import SweepParams, create_sweep_job, parse_coefs, parse_layers

    params = SweepParams(
        layers=parse_layers(values["layers"]),
        coefs=parse_coefs(values["coefs"]),
        n=_int(values, "n") or 0,
        judge=values["judge"],
        batch_size=_int(values, "batch_size"),
        **_engine_values(values),
    )
    return [create_sweep_job(store, trait, params)]
