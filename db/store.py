"""The SQLite store: one file, WAL mode, foreign keys on, forward migrations, and the typed
access layer every other module goes through (no SQL strings outside ``db/``)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db.errors import PersonaError, UnknownJobError, UnknownTraitError
from db.schema import MIGRATIONS, SCHEMA_VERSION
from db.traits import N_QUESTIONS_PER_SPLIT, InstructionPair, TraitDefinition, bundled_traits

JOB_STATUSES = ("pending", "running", "done", "failed", "cancelled")
# Columns a caller may change on a job row; the rest are set once.
_JOB_UPDATABLE = {
    "status",
    "pid",
    "host",
    "heartbeat",
    "done",
    "total",
    "message",
    "stats",
    "params",
    "started",
    "ended",
}
# Seconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 30.0


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class TraitSummary:
    name: str
    description: str
    source: str
    n_questions: int
    n_responses: int
    n_judged: int
    n_vectors: int


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    trait: str | None
    params: dict[str, Any]
    status: str
    pid: int | None
    heartbeat: str | None
    done: int
    total: int
    message: str
    stats: dict[str, Any]
    created: str
    started: str | None
    ended: str | None
    host: str | None = None


@dataclass(frozen=True)
class Response:
    id: int
    job: int
    trait: str
    side: str
    split: str
    question: int
    instruction: int
    sample: int
    question_text: str
    system_prompt: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    finish_reason: str
    model: str
    created: str
    prompt_text: str | None = None  # imported rows: the rendered prompt, system text included

    @property
    def key(self) -> tuple[int, int, int]:
        """The pairing key: pos and neg responses match on it, never on row order."""
        return (self.question, self.instruction, self.sample)


@dataclass(frozen=True)
class Judgment:
    id: int
    response: int
    metric: str
    judge: str
    score: float | None
    evidence: dict[str, Any]
    error: str | None
    tokens: int
    cost: float
    created: str


@dataclass(frozen=True)
class VectorRecord:
    id: int
    trait: str
    model: str
    kind: str
    path: str
    n_pairs: int
    threshold: float | None
    coherence: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    created: str = ""


class Store:
    """One open database. Cheap to open; open one per thread or process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise PersonaError(f"--db {self.path} is a folder; pass a file path such as persona.db")
        if not self.path.parent.exists():
            raise PersonaError(
                f"folder {self.path.parent} for --db does not exist; create it first"
            )
        # Imported on first open, not with the module: sqlite_utils loads pandas (about 0.3 s),
        # which the dashboard would otherwise pay before its first frame.
        import sqlite_utils

        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
            self.db = sqlite_utils.Database(conn)
            self._configure()
            self.created = self._migrate()
        except sqlite3.DatabaseError as exc:
            raise PersonaError(
                f"{self.path} is not a usable persona-studio database ({exc}); "
                "move it aside or pass another --db"
            ) from None
        if self.created:
            self._load_library()

    # ---- connection ---------------------------------------------------------------------
    def _configure(self) -> None:
        conn = self.db.conn
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.db.enable_wal()
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> bool:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise PersonaError(
                f"{self.path} was written by a newer persona-studio (schema {version}, this one "
                f"knows up to {SCHEMA_VERSION}); upgrade persona-studio to open it"
            )
        if version == SCHEMA_VERSION:
            return False
        conn = self.db.conn
        # Under the write lock, reading the version again: two processes opening an old
        # database at once must not both run the same step.
        conn.execute("BEGIN IMMEDIATE")
        try:
            start = self.schema_version
            for target in range(start, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[target]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        return start == 0

    @property
    def data_dir(self) -> Path:
        """Where this database's tensor files live: ``NAME.data/`` beside ``NAME.db``,
        wherever the process runs (an absolute path)."""
        return self.path.resolve().parent / f"{self.path.stem}.data"

    def _stored_path(self, path: str | Path) -> str:
        """A file path as the database keeps it: relative to ``data_dir`` when inside it (so
        the database and its folder can move together), else absolute."""
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.data_dir).as_posix()
        except ValueError:
            return str(resolved)

    def _file_path(self, stored: str) -> str:
        """The absolute path of a file the database names (the inverse of ``_stored_path``)."""
        return str(self.data_dir / stored) if not Path(stored).is_absolute() else stored

    @property
    def schema_version(self) -> int:
        return int(self.db.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all (nested blocks are savepoints).

        The outer block takes the write lock at BEGIN (IMMEDIATE): a deferred transaction that
        reads and then writes fails at once with "database is locked" when another process
        committed in between, without waiting out the busy timeout."""
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():  # a savepoint
                yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise

    def info(self) -> dict[str, Any]:
        counts = {name: self.db[name].count for name in self.db.table_names()}
        journal = self.db.conn.execute("PRAGMA journal_mode").fetchone()[0]
        return {
            "path": str(self.path.resolve()),
            "schema_version": self.schema_version,
            "journal_mode": journal,
            "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
            "tables": counts,
        }

    # ---- traits -------------------------------------------------------------------------
    def _load_library(self) -> None:
        with self.transaction():
            for trait in bundled_traits():
                self._write_trait(trait, "bundled")

    def save_trait(self, trait: TraitDefinition, source: str, *, replace: bool = True) -> None:
        """Store a validated trait, replacing its pairs and questions in one transaction."""
        trait.validate()
        if not replace and self.has_trait(trait.name):
            raise PersonaError(
                f"trait '{trait.name}' already exists; pass --force to replace it or pick a name"
            )
        with self.transaction():
            if self.has_trait(trait.name):
                self._refuse_changing_what_responses_used(trait)
            self._write_trait(trait, source)

    def _refuse_changing_what_responses_used(self, trait: TraitDefinition) -> None:
        """Stored answers were generated under the trait's instructions and questions and
        judged under its judge prompt: changing those under them would make every pair and
        judgment unreadable. The description may change freely."""
        answered = self.db.execute(
            "SELECT COUNT(*) FROM responses WHERE trait = ?", [trait.name]
        ).fetchone()[0]
        if not answered:
            return
        old = self.get_trait(trait.name)
        changed = [
            what
            for what, same in (
                ("instructions", old.instructions == trait.instructions),
                ("questions", old.questions == trait.questions),
                ("judge prompt", old.eval_prompt == trait.eval_prompt),
                ("assistant name", old.assistant_name == trait.assistant_name),
            )
            if not same
        ]
        if changed:
            raise PersonaError(
                f"trait '{trait.name}' has {answered} responses made under its current "
                f"{', '.join(changed)}; save the new definition under another name, or delete "
                f"the trait's data first (`persona traits delete {trait.name}`)"
            )

    def _write_trait(self, trait: TraitDefinition, source: str) -> None:
        now = utc_now()
        existing = self.db["traits"].rows_where("name = ?", [trait.name], select="created")
        created = next(iter(existing), {}).get("created", now)
        self.db["traits"].upsert(
            {
                "name": trait.name,
                "description": trait.description,
                "assistant_name": trait.assistant_name,
                "eval_prompt": trait.eval_prompt,
                "source": source,
                "created": created,
                "updated": now,
            },
            pk="name",
        )
        self.db["instructions"].delete_where("trait = ?", [trait.name])
        self.db["questions"].delete_where("trait = ?", [trait.name])
        self.db["instructions"].insert_all(
            {"trait": trait.name, "idx": i, "pos": p.pos, "neg": p.neg}
            for i, p in enumerate(trait.instructions)
        )
        self.db["questions"].insert_all(
            {
                "trait": trait.name,
                "idx": i,
                "text": q,
                "split": "extract" if i < N_QUESTIONS_PER_SPLIT else "eval",
            }
            for i, q in enumerate(trait.questions)
        )

    def has_trait(self, name: str) -> bool:
        return self.db["traits"].count_where("name = ?", [name]) > 0

    def get_trait(self, name: str) -> TraitDefinition:
        rows = list(self.db["traits"].rows_where("name = ?", [name]))
        if not rows:
            raise UnknownTraitError(name)
        row = rows[0]
        pairs = self.db["instructions"].rows_where("trait = ?", [name], order_by="idx")
        questions = self.db["questions"].rows_where("trait = ?", [name], order_by="idx")
        return TraitDefinition(
            name=row["name"],
            description=row["description"],
            instructions=tuple(InstructionPair(p["pos"], p["neg"]) for p in pairs),
            questions=tuple(q["text"] for q in questions),
            eval_prompt=row["eval_prompt"],
            assistant_name=row["assistant_name"],
        )

    def trait_source(self, name: str) -> str:
        rows = list(self.db["traits"].rows_where("name = ?", [name], select="source"))
        if not rows:
            raise UnknownTraitError(name)
        return rows[0]["source"]

    def delete_trait(self, name: str) -> None:
        if not self.has_trait(name):
            raise UnknownTraitError(name)
        with self.transaction():
            self.db["traits"].delete(name)

    def list_traits(self) -> list[TraitSummary]:
        sql = """
            SELECT t.name, t.description, t.source,
                (SELECT COUNT(*) FROM questions q WHERE q.trait = t.name) AS n_questions,
                (SELECT COUNT(*) FROM responses r WHERE r.trait = t.name) AS n_responses,
                (SELECT COUNT(DISTINCT j.response) FROM judgments j
                    JOIN responses r ON r.id = j.response
                    WHERE r.trait = t.name AND j.score IS NOT NULL) AS n_judged,
                (SELECT COUNT(*) FROM vectors v WHERE v.trait = t.name) AS n_vectors
            FROM traits t ORDER BY t.name
        """
        return [TraitSummary(**row) for row in self.db.query(sql)]

    # ---- jobs ---------------------------------------------------------------------------
    def create_job(self, kind: str, trait: str | None, params: dict[str, Any]) -> Job:
        if trait is not None and not self.has_trait(trait):
            raise UnknownTraitError(trait)
        with self.transaction():
            job_id = (
                self.db["jobs"]
                .insert(
                    {
                        "kind": kind,
                        "trait": trait,
                        "params": json.dumps(params, sort_keys=True),
                        "status": "pending",
                        "created": utc_now(),
                    }
                )
                .last_pk
            )
        return self.get_job(int(job_id))

    def get_job(self, job_id: int) -> Job:
        rows = list(self.db["jobs"].rows_where("id = ?", [job_id]))
        if not rows:
            raise UnknownJobError(job_id)
        return _job(rows[0])

    def update_job(
        self, job_id: int, *, only_if: dict[str, Any] | None = None, **fields: Any
    ) -> bool:
        """Change a job row. With ``only_if`` (column: value, NULL matching NULL) the row
        changes only if it still holds those values, and the answer says whether it did: a
        worker writes only while the row names it, a reaper only what it looked at."""
        unknown = (set(fields) | set(only_if or {})) - _JOB_UPDATABLE
        if unknown:
            raise ValueError(f"job fields not updatable: {sorted(unknown)}")
        if "status" in fields and fields["status"] not in JOB_STATUSES:
            raise ValueError(f"bad job status {fields['status']!r}")
        for key in ("params", "stats"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], sort_keys=True)
        with self.transaction():
            if only_if is None:
                if self.db["jobs"].count_where("id = ?", [job_id]) == 0:
                    raise UnknownJobError(job_id)
                self.db["jobs"].update(job_id, fields)
                return True
            # Column names come from _JOB_UPDATABLE (checked above), values are bound.
            assignments = ", ".join(f"{column} = ?" for column in fields)
            conditions = "".join(f" AND {column} IS ?" for column in only_if)
            cursor = self.db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?{conditions}",
                [*fields.values(), job_id, *only_if.values()],
            )
            return cursor.rowcount == 1

    def list_jobs(
        self, trait: str | None = None, status: str | None = None, kind: str | None = None
    ) -> list[Job]:
        where, args = _where({"trait": trait, "status": status, "kind": kind})
        return [_job(r) for r in self.db["jobs"].rows_where(where, args, order_by="id")]

    # ---- responses ----------------------------------------------------------------------
    def add_responses(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert responses in one transaction; a row whose (job, question, instruction,
        sample) is already stored is skipped, so a rerun never duplicates. Returns rows added."""
        now = utc_now()
        prepared = []
        for row in rows:
            row = dict(row)
            row["prompt_ids"] = json.dumps([int(t) for t in row["prompt_ids"]])
            row["answer_ids"] = json.dumps([int(t) for t in row["answer_ids"]])
            row.setdefault("created", now)
            prepared.append(row)
        return self._insert_new(
            "responses", prepared, conflict=("job", "question", "instruction", "sample")
        )

    def _insert_new(self, table: str, rows: list[dict[str, Any]], conflict: tuple[str, ...]) -> int:
        """Insert rows in one transaction, skipping those whose ``conflict`` key is stored.
        Unlike INSERT OR IGNORE, any other constraint violation still fails the batch."""
        if not rows:
            return 0
        columns = list(rows[0])
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
        )
        with self.transaction():
            before = self.db.conn.total_changes
            self.db.conn.executemany(sql, [[row[c] for c in columns] for row in rows])
            return self.db.conn.total_changes - before

    def response_keys_of_trait(self, trait: str) -> set[tuple[int, int, int]]:
        rows = self.db["responses"].rows_where(
            "trait = ?", [trait], select="question, instruction, sample"
        )
        return {(r["question"], r["instruction"], r["sample"]) for r in rows}

    def response_keys(self, job_id: int) -> set[tuple[int, int, int]]:
        rows = self.db["responses"].rows_where(
            "job = ?", [job_id], select="question, instruction, sample"
        )
        return {(r["question"], r["instruction"], r["sample"]) for r in rows}

    def get_response(self, response_id: int) -> Response:
        rows = list(self.db["responses"].rows_where("id = ?", [response_id]))
        if not rows:
            raise PersonaError(f"unknown response id {response_id}; check the id")
        return _response(rows[0])

    def responses_by_id(self, ids: list[int]) -> list[Response]:
        """Responses in the order of ``ids``."""
        found: dict[int, Response] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self.db["responses"].rows_where(f"id IN ({marks})", chunk):
                found[row["id"]] = _response(row)
        missing = [i for i in ids if i not in found]
        if missing:
            raise PersonaError(f"unknown response id {missing[0]}; check the id")
        return [found[i] for i in ids]

    def responses(
        self,
        *,
        job: int | None = None,
        trait: str | None = None,
        side: str | None = None,
        split: str | None = None,
    ) -> list[Response]:
        where, args = _where({"job": job, "trait": trait, "side": side, "split": split})
        return [_response(r) for r in self.db["responses"].rows_where(where, args, order_by="id")]

    # ---- judgments ----------------------------------------------------------------------
    def add_judgments(self, rows: Iterable[dict[str, Any]]) -> int:
        """Store judgments in one transaction; a new judgment of the same (response, metric,
        judge) replaces the old one (a re-judge). Returns rows written."""
        now = utc_now()
        prepared = []
        for row in rows:
            row = dict(row)
            row["evidence"] = json.dumps(row.get("evidence") or {}, sort_keys=True)
            row.setdefault("created", now)
            prepared.append(row)
        if not prepared:
            return 0
        columns = list(prepared[0])
        updates = ", ".join(
            f"{c} = excluded.{c}" for c in columns if c not in ("response", "metric", "judge")
        )
        sql = (
            f"INSERT INTO judgments ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT (response, metric, judge) DO UPDATE SET {updates}"
        )
        with self.transaction():
            self.db.conn.executemany(sql, [[row.get(c) for c in columns] for row in prepared])
        return len(prepared)

    def responses_to_judge(
        self, *, trait: str, metric: str, judge: str, job: int | None = None
    ) -> list[Response]:
        """Responses with no judgment for (metric, judge), or whose judgment failed with an
        error; a refusal (no score, no error) is an answer and is not asked again."""
        where = (
            "trait = ? AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.response = responses.id "
            "AND j.metric = ? AND j.judge = ? AND j.error IS NULL)"
        )
        args: list[Any] = [trait, metric, judge]
        if job is not None:
            where += " AND job = ?"
            args.append(job)
        return [_response(r) for r in self.db["responses"].rows_where(where, args, order_by="id")]

    def count_judgments(self, *, trait: str, metric: str, judge: str) -> dict[str, int]:
        """Counts of scored, refused (no score) and failed judgments for a trait."""
        sql = """
            SELECT
                SUM(j.score IS NOT NULL) AS scored,
                SUM(j.score IS NULL AND j.error IS NULL) AS refused,
                SUM(j.error IS NOT NULL) AS failed
            FROM judgments j JOIN responses r ON r.id = j.response
            WHERE r.trait = ? AND j.metric = ? AND j.judge = ?
        """
        row = next(iter(self.db.query(sql, [trait, metric, judge])))
        return {k: int(v or 0) for k, v in row.items()}

    def cached_judge_results(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self.db.query(f"SELECT * FROM judge_cache WHERE key IN ({marks})", chunk):
                found[row["key"]] = {**row, "evidence": json.loads(row["evidence"])}
        return found

    def cache_judge_results(self, rows: Iterable[dict[str, Any]]) -> None:
        now = utc_now()
        prepared = [
            {
                **row,
                "evidence": json.dumps(row.get("evidence") or {}, sort_keys=True),
                "created": now,
            }
            for row in rows
        ]
        with self.transaction():
            self.db["judge_cache"].upsert_all(prepared, pk="key")

    def delete_judgments(self, response: int, judge: str) -> None:
        """Forget a response's judgments by one judge (to ask again)."""
        with self.transaction():
            self.db["judgments"].delete_where("response = ? AND judge = ?", [response, judge])

    def judgments(self, response: int) -> list[Judgment]:
        rows = self.db["judgments"].rows_where("response = ?", [response], order_by="metric")
        return [_judgment(r) for r in rows]

    # ---- pairs ------------------------------------------------------------------------
    def scored_responses(self, jobs: list[int], judge: str) -> list[dict[str, Any]]:
        """Every response of these jobs with its trait and coherence scores by ``judge``
        (None when missing or failed)."""
        marks = ", ".join("?" for _ in jobs)
        sql = f"""
            SELECT r.id, r.job, r.side, r.question, r.instruction, r.sample,
                (SELECT score FROM judgments j WHERE j.response = r.id AND j.metric = 'trait'
                    AND j.judge = ? AND j.error IS NULL) AS trait,
                (SELECT score FROM judgments j WHERE j.response = r.id
                    AND j.metric = 'coherence' AND j.judge = ? AND j.error IS NULL) AS coherence
            FROM responses r WHERE r.job IN ({marks}) ORDER BY r.id
        """
        return list(self.db.query(sql, [judge, judge, *jobs]))

    def judged_by(self, jobs: list[int], judge: str) -> bool:
        """Whether ``judge`` scored any response of these jobs."""
        marks = ", ".join("?" for _ in jobs)
        sql = f"""
            SELECT 1 FROM judgments j JOIN responses r ON r.id = j.response
            WHERE r.job IN ({marks}) AND j.judge = ? LIMIT 1
        """
        return bool(list(self.db.query(sql, [*jobs, judge])))

    def judges_of(self, jobs: list[int], sample: int = 500) -> list[str]:
        """Judges that scored these jobs' responses, the most used first, read from the
        jobs' first ``sample`` responses (a whole-table count is slow at 100,000 rows)."""
        marks = ", ".join("?" for _ in jobs)
        sql = f"""
            SELECT j.judge, COUNT(*) AS n FROM judgments j
            WHERE j.response IN (
                SELECT id FROM responses WHERE job IN ({marks}) ORDER BY id LIMIT ?
            )
            GROUP BY j.judge ORDER BY n DESC, j.judge
        """
        return [row["judge"] for row in self.db.query(sql, [*jobs, sample])]

    def pair_rows(self, query: PairQuery, offset: int = 0, limit: int = 200) -> list[dict]:
        """One page of pairs (matched by key) with their scores and the filter's reason,
        computed in SQL so a review screen pages through 100,000 responses quickly."""
        sql, args = _pairs_sql(query)
        sql += " ORDER BY question, instruction, sample LIMIT ? OFFSET ?"
        return list(self.db.query(sql, [*args, limit, offset]))

    def pair_reason_counts(self, query: PairQuery) -> dict[str, int]:
        sql, args = _pairs_sql(query)
        grouped = f"SELECT reason, COUNT(*) AS n FROM ({sql}) GROUP BY reason"
        return {row["reason"]: row["n"] for row in self.db.query(grouped, args)}

    def set_override(
        self, trait: str, key: tuple[int, int, int], include: bool | None, note: str = ""
    ) -> None:
        """Include or exclude a pair by hand; ``None`` removes the override."""
        question, instruction, sample = key
        with self.transaction():
            self.db["overrides"].delete_where(
                "trait = ? AND question = ? AND instruction = ? AND sample = ?",
                [trait, question, instruction, sample],
            )
            if include is not None:
                self.db["overrides"].insert(
                    {
                        "trait": trait,
                        "question": question,
                        "instruction": instruction,
                        "sample": sample,
                        "include": int(include),
                        "note": note,
                        "created": utc_now(),
                    }
                )

    def overrides(self, trait: str) -> dict[tuple[int, int, int], bool]:
        rows = self.db["overrides"].rows_where("trait = ?", [trait])
        return {(r["question"], r["instruction"], r["sample"]): bool(r["include"]) for r in rows}

    def record_pair_counts(
        self,
        *,
        trait: str,
        pos_job: int,
        neg_job: int,
        judge: str,
        threshold: float,
        coherence: float,
        counts: dict[str, int],
    ) -> None:
        with self.transaction():
            self.db["pair_counts"].insert(
                {
                    "trait": trait,
                    "pos_job": pos_job,
                    "neg_job": neg_job,
                    "judge": judge,
                    "threshold": threshold,
                    "coherence": coherence,
                    "counts": json.dumps(counts, sort_keys=True),
                    "created": utc_now(),
                }
            )

    def latest_pair_counts(self, trait: str) -> dict[str, Any] | None:
        rows = list(
            self.db["pair_counts"].rows_where("trait = ?", [trait], order_by="id desc", limit=1)
        )
        return {**rows[0], "counts": json.loads(rows[0]["counts"])} if rows else None

    # ---- vectors ------------------------------------------------------------------------
    def add_vector(
        self,
        *,
        trait: str,
        model: str,
        kind: str,
        path: str,
        n_pairs: int,
        threshold: float | None,
        coherence: float | None,
        metadata: dict[str, Any],
    ) -> VectorRecord:
        stored = self._stored_path(path)
        with self.transaction():
            self.db["vectors"].delete_where("path = ?", [stored])
            self.db["vectors"].insert(
                {
                    "trait": trait,
                    "model": model,
                    "kind": kind,
                    "path": stored,
                    "n_pairs": n_pairs,
                    "threshold": threshold,
                    "coherence": coherence,
                    "metadata": json.dumps(metadata, sort_keys=True),
                    "created": utc_now(),
                }
            )
        return self.vectors(path=self._file_path(stored))[0]

    def vectors(
        self, *, trait: str | None = None, kind: str | None = None, path: str | None = None
    ) -> list[VectorRecord]:
        """Vector records; their ``path`` is absolute, resolved against this database."""
        stored = self._stored_path(path) if path is not None else None
        where, args = _where({"trait": trait, "kind": kind, "path": stored})
        rows = self.db["vectors"].rows_where(where, args, order_by="id")
        return [
            VectorRecord(
                **{**r, "path": self._file_path(r["path"]), "metadata": json.loads(r["metadata"])}
            )
            for r in rows
        ]


# ---- pairs in SQL ----------------------------------------------------------------------
PAIR_STATUSES = ("all", "effective", "filtered")


@dataclass(frozen=True)
class PairQuery:
    """Which pairs a review shows: the two jobs, whose scores, the rule's thresholds, and
    the status and question-text filters."""

    trait: str
    pos_job: int
    neg_job: int
    judge: str
    threshold: float
    coherence: float
    status: str = "all"
    search: str = ""


_EFFECTIVE = "('effective', 'included by hand')"


def _pairs_sql(query: PairQuery) -> tuple[str, list[Any]]:
    """The pairs query; its CASE is the rule of ``pipeline.filter.classify`` (a test keeps
    the two equal). Every value is a bound parameter."""
    status, search = query.status, query.search
    if status not in PAIR_STATUSES:
        raise PersonaError(f"status must be one of {', '.join(PAIR_STATUSES)}, not '{status}'")
    side = """
        SELECT r.id, r.question, r.instruction, r.sample, r.question_text,
            jt.score AS t, jc.score AS c
        FROM responses r
        LEFT JOIN judgments jt ON jt.response = r.id AND jt.metric = 'trait'
            AND jt.judge = ? AND jt.error IS NULL
        LEFT JOIN judgments jc ON jc.response = r.id AND jc.metric = 'coherence'
            AND jc.judge = ? AND jc.error IS NULL
        WHERE r.job = ?
    """
    sql = f"""
        WITH pos AS ({side}), neg AS ({side})
        SELECT * FROM (
            SELECT pos.question AS question, pos.instruction AS instruction,
                pos.sample AS sample, pos.question_text AS question_text,
                pos.id AS pos_id, neg.id AS neg_id, pos.t AS pos_trait, neg.t AS neg_trait,
                pos.c AS pos_coherence, neg.c AS neg_coherence,
                CASE
                    WHEN o.include = 1 THEN 'included by hand'
                    WHEN o.include = 0 THEN 'excluded by hand'
                    WHEN pos.t IS NULL OR neg.t IS NULL OR pos.c IS NULL OR neg.c IS NULL
                        THEN 'unscored'
                    WHEN pos.t < ? THEN 'pos too low'
                    WHEN neg.t >= 100 - ? THEN 'neg too high'
                    WHEN pos.c < ? OR neg.c < ? THEN 'incoherent'
                    ELSE 'effective'
                END AS reason
            FROM pos JOIN neg ON pos.question = neg.question
                AND pos.instruction = neg.instruction AND pos.sample = neg.sample
            LEFT JOIN overrides o ON o.trait = ? AND o.question = pos.question
                AND o.instruction = pos.instruction AND o.sample = pos.sample
        ) WHERE 1 = 1
    """
    q = query
    args: list[Any] = [
        *(q.judge, q.judge, q.pos_job),  # the pos side
        *(q.judge, q.judge, q.neg_job),  # the neg side
        *(q.threshold, q.threshold, q.coherence, q.coherence),  # the rule
        q.trait,  # the overrides
    ]
    if status == "effective":
        sql += f" AND reason IN {_EFFECTIVE}"
    elif status == "filtered":
        sql += f" AND reason NOT IN {_EFFECTIVE}"
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        sql += " AND question_text LIKE ? ESCAPE '\\'"
        args.append(f"%{escaped}%")
    return sql, args


# ---- row conversion -------------------------------------------------------------------
def _statements(script: str) -> list[str]:
    """A migration script as single statements (executescript would commit first)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete statement in a migration: {current.strip()[:60]!r}")
    return statements


def _where(filters: dict[str, Any]) -> tuple[str | None, list[Any]]:
    used = {k: v for k, v in filters.items() if v is not None}
    if not used:
        return None, []
    # Keys are our own column names; values are always bound parameters.
    return " AND ".join(f"{k} = ?" for k in used), list(used.values())


def _job(row: dict[str, Any]) -> Job:
    return Job(**{**row, "params": json.loads(row["params"]), "stats": json.loads(row["stats"])})


def _response(row: dict[str, Any]) -> Response:
    return Response(
        **{
            **row,
            "prompt_ids": json.loads(row["prompt_ids"]),
            "answer_ids": json.loads(row["answer_ids"]),
        }
    )


def _judgment(row: dict[str, Any]) -> Judgment:
    return Judgment(**{**row, "evidence": json.loads(row["evidence"])})
