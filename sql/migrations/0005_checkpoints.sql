-- 0005_checkpoints: training checkpoints stored in PostgreSQL, so a job taken over after a crash resumes
-- on any machine (no shared disk, no hub). A checkpoint row is written with all its files in one
-- transaction: it exists whole or not at all. Plain SQL, idempotent, runnable with psql.

CREATE TABLE IF NOT EXISTS pgml.checkpoints (
    id         bigserial PRIMARY KEY,
    job_id     bigint NOT NULL REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt    integer NOT NULL,
    step       bigint NOT NULL,
    files      integer NOT NULL DEFAULT 0,
    bytes      bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (job_id, step)
);

-- weights, optimizer and scheduler state, RNG, trainer state, and the job's data snapshot
CREATE TABLE IF NOT EXISTS pgml.checkpoint_files (
    checkpoint_id bigint NOT NULL REFERENCES pgml.checkpoints (id) ON DELETE CASCADE,
    path          text NOT NULL,
    part          integer NOT NULL,
    data          bytea NOT NULL,
    PRIMARY KEY (checkpoint_id, path, part)
);
ALTER TABLE pgml.checkpoint_files ALTER COLUMN data SET STORAGE EXTERNAL;

INSERT INTO pgml.schema_migrations (version) VALUES ('0005_checkpoints') ON CONFLICT DO NOTHING;
