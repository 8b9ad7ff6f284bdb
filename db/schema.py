"""The schema as forward migrations. ``PRAGMA user_version`` holds the version a database is at;
migration i takes it from version i to i + 1. Never edit a shipped migration: append one."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE traits (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        assistant_name TEXT NOT NULL DEFAULT '',
        eval_prompt TEXT NOT NULL,
        source TEXT NOT NULL,
        created TEXT NOT NULL,
        updated TEXT NOT NULL
    );
    CREATE TABLE instructions (
        trait TEXT NOT NULL REFERENCES traits(name) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        pos TEXT NOT NULL,
        neg TEXT NOT NULL,
        PRIMARY KEY (trait, idx)
    );
    CREATE TABLE questions (
        trait TEXT NOT NULL REFERENCES traits(name) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        text TEXT NOT NULL,
        split TEXT NOT NULL CHECK (split IN ('extract', 'eval')),
        PRIMARY KEY (trait, idx)
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        trait TEXT REFERENCES traits(name) ON DELETE SET NULL,
        params TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
        pid INTEGER,
        heartbeat TEXT,
        done INTEGER NOT NULL DEFAULT 0,
        total INTEGER NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '',
        stats TEXT NOT NULL DEFAULT '{}',
        created TEXT NOT NULL,
        started TEXT,
        ended TEXT
    );
    CREATE INDEX jobs_trait ON jobs(trait);
    CREATE TABLE responses (
        id INTEGER PRIMARY KEY,
        job INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        trait TEXT NOT NULL REFERENCES traits(name) ON DELETE CASCADE,
        side TEXT NOT NULL CHECK (side IN ('pos', 'neg', 'none')),
        split TEXT NOT NULL,
        question INTEGER NOT NULL,
        instruction INTEGER NOT NULL,
        sample INTEGER NOT NULL,
        question_text TEXT NOT NULL,
        system_prompt TEXT NOT NULL,
        prompt_ids TEXT NOT NULL,
        answer_ids TEXT NOT NULL,
        answer TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        model TEXT NOT NULL,
        created TEXT NOT NULL,
        UNIQUE (job, question, instruction, sample)
    );
    CREATE INDEX responses_pair ON responses(trait, side, split, question, instruction, sample);
    CREATE TABLE judgments (
        id INTEGER PRIMARY KEY,
        response INTEGER NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
        metric TEXT NOT NULL,
        judge TEXT NOT NULL,
        score REAL CHECK (score IS NULL OR (score >= 0 AND score <= 100)),
        evidence TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        tokens INTEGER NOT NULL DEFAULT 0,
        cost REAL NOT NULL DEFAULT 0,
        created TEXT NOT NULL,
        UNIQUE (response, metric, judge)
    );
    CREATE TABLE vectors (
        id INTEGER PRIMARY KEY,
        trait TEXT NOT NULL REFERENCES traits(name) ON DELETE CASCADE,
        model TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL UNIQUE,
        n_pairs INTEGER NOT NULL,
        threshold REAL,
        coherence REAL,
        metadata TEXT NOT NULL DEFAULT '{}',
        created TEXT NOT NULL
    );
    CREATE INDEX vectors_trait ON vectors(trait, model, kind);
    """,
    # 1 -> 2: judge results cached by request, so no identical request is sent twice.
    """
    CREATE TABLE judge_cache (
        key TEXT PRIMARY KEY,
        judge TEXT NOT NULL,
        score REAL,
        evidence TEXT NOT NULL DEFAULT '{}',
        tokens INTEGER NOT NULL DEFAULT 0,
        cost REAL NOT NULL DEFAULT 0,
        created TEXT NOT NULL
    );
    CREATE INDEX judgments_metric ON judgments(metric, judge);
    """,
    # 2 -> 3: hand-made include/exclude decisions on pairs, and the filter's counts.
    """
    CREATE TABLE overrides (
        trait TEXT NOT NULL REFERENCES traits(name) ON DELETE CASCADE,
        question INTEGER NOT NULL,
        instruction INTEGER NOT NULL,
        sample INTEGER NOT NULL,
        include INTEGER NOT NULL CHECK (include IN (0, 1)),
        note TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL,
        PRIMARY KEY (trait, question, instruction, sample)
    );
    CREATE TABLE pair_counts (
        id INTEGER PRIMARY KEY,
        trait TEXT NOT NULL REFERENCES traits(name) ON DELETE CASCADE,
        pos_job INTEGER NOT NULL,
        neg_job INTEGER NOT NULL,
        judge TEXT NOT NULL,
        threshold REAL NOT NULL,
        coherence REAL NOT NULL,
        counts TEXT NOT NULL,
        created TEXT NOT NULL
    );
    CREATE INDEX judgments_response ON judgments(response);
    """,
    # 3 -> 4: the host of a job's worker, so a lock is judged by pid on its own host and by
    # heartbeat alone from another (a database on a shared filesystem).
    """
    ALTER TABLE jobs ADD COLUMN host TEXT;
    """,
    # 4 -> 5: vector paths relative to the database's own data folder (NAME.data/), never to
    # the working directory of the process that wrote them. Older rows hold a path through
    # some "NAME.data/" folder (relative to where the command ran, or absolute): keep what
    # follows it. A path through no data folder (a file elsewhere) stays as it was.
    """
    UPDATE vectors SET path = substr(path, instr(path, '.data/') + 6)
        WHERE instr(path, '.data/') > 0;
    """,
    # 5 -> 6: the rendered prompt text of an imported row (the CSV holds no system prompt),
    # so a forward pass with another tokenizer reads exactly the prompt the row was made of.
    """
    ALTER TABLE responses ADD COLUMN prompt_text TEXT;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
