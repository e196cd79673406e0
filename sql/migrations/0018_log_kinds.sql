-- 0018_log_kinds: everything a job's worker knows about the job reaches SQL, and each training step is reported
-- once however often the job was resumed. Plain SQL, idempotent, runnable with psql by an administrator.
--
-- pgml.logs.kind: 'train' (a Trainer log event, as before: the guide's loss query reads these), 'info', 'warning' or
-- 'error' (a line about the job: {"message": "<human text>", ...structured fields}). The child writes its lines
-- (rows read, split sizes, resuming from step N, checkpoints and files stored, stopped by SIGINT) through
-- pgml._child_log, fenced on its attempt's ticket as before; what happens to the job itself (claimed by worker X,
-- requeued, its lease expired, taken over by worker Y, failed with the reason, cancelled, succeeded) is written by a
-- trigger on pgml.jobs in the transaction that makes the change, whoever makes it (a worker, a reaper, pgml.cancel).
--
-- pgml.superseded_logs: when an attempt resumes from a checkpoint at step N (or starts over from step 0), the
-- training rows of earlier attempts past step N — and the summary row (train_runtime) an interrupted attempt
-- left — are moved there, in the same transaction that records the resume (pgml._child_resume). pgml.logs then
-- holds each step once, as the run that produced the final model saw it; what the interrupted attempts logged is
-- kept apart, readable by the same roles.

ALTER TABLE pgml.logs ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'train';
DO $$
BEGIN
    ALTER TABLE pgml.logs ADD CONSTRAINT logs_kind_check CHECK (kind IN ('train', 'info', 'warning', 'error'));
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;

CREATE TABLE IF NOT EXISTS pgml.superseded_logs (
    id                bigint PRIMARY KEY,  -- its id in pgml.logs
    model_id          bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    project_id        bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    job_id            bigint REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt           integer,
    seq               integer,
    created_at        timestamptz NOT NULL,
    kind              text NOT NULL,
    logs              jsonb NOT NULL,
    superseded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    superseded_by     integer NOT NULL,  -- the attempt that resumed
    resumed_from_step bigint NOT NULL    -- from the checkpoint of this step (0: started over)
);
CREATE INDEX IF NOT EXISTS superseded_logs_job_idx ON pgml.superseded_logs (job_id, id);
CREATE INDEX IF NOT EXISTS superseded_logs_model_idx ON pgml.superseded_logs (model_id, id);

ALTER TABLE pgml.superseded_logs ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS worker_all ON pgml.superseded_logs;
CREATE POLICY worker_all ON pgml.superseded_logs TO pgml_worker USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS user_read ON pgml.superseded_logs;
CREATE POLICY user_read ON pgml.superseded_logs FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = superseded_logs.model_id));

INSERT INTO pgml.schema_migrations (version) VALUES ('0018_log_kinds') ON CONFLICT DO NOTHING;
