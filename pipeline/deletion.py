"""Deleting a trait: what it holds (rows and files), then all of it, files included, so the
data folder keeps nothing that no row names. Files outside the database's data folder (a
vector imported from elsewhere) are never touched."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from db import PersonaError, Store, UnknownTraitError


@dataclass
class TraitContents:
    name: str
    responses: int
    judgments: int
    vectors: int
    jobs: int
    files: list[Path] = field(default_factory=list)  # inside the data folder: removed

    def summary(self) -> str:
        return (
            f"{self.responses} responses, {self.judgments} judgments, {self.vectors} vectors, "
            f"{self.jobs} jobs and {len(self.files)} files"
        )


def trait_contents(store: Store, name: str) -> TraitContents:
    if not store.has_trait(name):
        raise UnknownTraitError(name)

    def count(sql: str) -> int:
        return int(store.db.execute(sql, [name]).fetchone()[0])

    jobs = [job.id for job in store.list_jobs(trait=name)]
    data = store.data_dir
    candidates: list[Path] = []
    for record in store.vectors(trait=name):
        path = Path(record.path)
        candidates += [path, path.with_suffix(".json")]
    for job_id in jobs:
        candidates += [data / "activations" / f"job-{job_id}", data / "logs" / f"job-{job_id}.log"]
    files = [p for p in candidates if p.exists() and p.resolve().is_relative_to(data)]
    return TraitContents(
        name=name,
        responses=count("SELECT COUNT(*) FROM responses WHERE trait = ?"),
        judgments=count(
            "SELECT COUNT(*) FROM judgments j JOIN responses r ON r.id = j.response "
            "WHERE r.trait = ?"
        ),
        vectors=count("SELECT COUNT(*) FROM vectors WHERE trait = ?"),
        jobs=len(jobs),
        files=files,
    )


def delete_trait(store: Store, name: str) -> TraitContents:
    """Delete the trait's rows (one transaction), then its files; returns what went."""
    from pipeline.job_processes import current_jobs

    contents = trait_contents(store, name)
    jobs = current_jobs(store, trait=name)
    running = [job.id for job in jobs if job.status == "running"]
    if running:
        raise PersonaError(
            f"job {running[0]} of trait '{name}' is running; cancel it first with "
            f"`persona jobs cancel {running[0]}`, then delete"
        )
    with store.transaction():
        for job in jobs:  # a job would only lose its trait on cascade; it goes with it
            store.db.execute("DELETE FROM jobs WHERE id = ?", [job.id])
        store.delete_trait(name)
    for path in contents.files:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return contents
