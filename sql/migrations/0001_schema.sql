-- 0001_schema: the pgml schema: projects, models, jobs (the queue), logs, files, and the job audit trail.
-- Plain SQL, idempotent, runnable with psql: psql "$DSN" -v ON_ERROR_STOP=1 -f sql/migrations/0001_schema.sql
-- `pgml-tuned migrate` applies every file in sql/migrations in order and records it in pgml.schema_migrations.

CREATE SCHEMA IF NOT EXISTS pgml;

CREATE TABLE IF NOT EXISTS pgml.schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS pgml.projects (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    task       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS pgml.models (
    id            bigserial PRIMARY KEY,
    project_id    bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    status        text NOT NULL DEFAULT 'in_progress'
                  CHECK (status IN ('in_progress', 'successful', 'failed', 'cancelled')),
    task          text NOT NULL,
    model_name    text NOT NULL,          -- as submitted (hub id, local dir, or pgml:... reference)
    base_model    text,                   -- for LoRA adapters: the model the adapter loads onto
    relation_name text,
    hyperparams   jsonb NOT NULL DEFAULT '{}',  -- secrets removed at submit time
    metrics       jsonb,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS models_project_idx ON pgml.models (project_id, id);

-- The queue. Every column a worker writes is fenced by `attempt` (see daemon/pgml_tuned/states.py for the
-- state machine: which process moves a job between which states, and what each transition writes).
CREATE TABLE IF NOT EXISTS pgml.jobs (
    id               bigserial PRIMARY KEY,
    project_id       bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    model_id         bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    task             text NOT NULL,
    relation_name    text,                -- as submitted
    relation_schema  text,                -- resolved at submit time
    relation_table   text,
    model_name       text NOT NULL,
    test_size        double precision NOT NULL,
    test_sampling    text NOT NULL,
    hyperparams      jsonb NOT NULL DEFAULT '{}',   -- secrets removed
    secrets          text,                -- sealed with the workers' public key; never plain text
    submitted_by     text NOT NULL DEFAULT current_user,
    priority         integer NOT NULL DEFAULT 0,
    attempt          integer NOT NULL DEFAULT 0,    -- bumped by every claim: the fencing token
    failed_attempts  integer NOT NULL DEFAULT 0,    -- lost leases counted against max_attempts
    max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    worker           text,
    lease_expires_at timestamptz,
    heartbeat_at     timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress         jsonb NOT NULL DEFAULT '{}',  -- latest step, max_steps, epoch, loss
    metrics          jsonb,
    error            text,
    errors           jsonb NOT NULL DEFAULT '[]',  -- one entry per failed attempt
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS jobs_queued_idx ON pgml.jobs (priority DESC, id) WHERE status = 'queued';
-- no lease column in any index: a heartbeat (lease_expires_at, heartbeat_at) is then a HOT update
CREATE INDEX IF NOT EXISTS jobs_running_idx ON pgml.jobs (id) WHERE status = 'running';
-- heartbeats are not data changes worth re-ANALYZEing for (they were ~90 % of the heartbeat WAL)
ALTER TABLE pgml.jobs SET (fillfactor = 80, autovacuum_analyze_threshold = 5000);
CREATE INDEX IF NOT EXISTS jobs_model_idx ON pgml.jobs (model_id);

-- One row per Trainer log event, committed as it happens.
CREATE TABLE IF NOT EXISTS pgml.logs (
    id         bigserial PRIMARY KEY,
    model_id   bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    project_id bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    job_id     bigint REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt    integer,
    seq        integer,  -- the writer's sequence number within its attempt: a retried write never duplicates
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    logs       jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_model_idx ON pgml.logs (model_id, id);
CREATE INDEX IF NOT EXISTS logs_job_idx ON pgml.logs (job_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS logs_seq_idx ON pgml.logs (job_id, attempt, seq);

-- Every file of a trained model, in parts of at most a few MB (reassemble ordered by part).
CREATE TABLE IF NOT EXISTS pgml.files (
    id       bigserial PRIMARY KEY,
    model_id bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    path     text NOT NULL,
    part     integer NOT NULL,
    data     bytea NOT NULL,
    UNIQUE (model_id, path, part)
);
-- weights are incompressible: skip pglz and store out of line directly
ALTER TABLE pgml.files ALTER COLUMN data SET STORAGE EXTERNAL;

-- Audit of every status/attempt change (who owned which attempt when); written by trigger.
CREATE TABLE IF NOT EXISTS pgml.job_events (
    id               bigserial PRIMARY KEY,
    job_id           bigint NOT NULL REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    worker           text,
    old_status       text,
    new_status       text NOT NULL,
    lease_expires_at timestamptz,
    at               timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS job_events_job_idx ON pgml.job_events (job_id, id);

INSERT INTO pgml.schema_migrations (version) VALUES ('0001_schema') ON CONFLICT DO NOTHING;
