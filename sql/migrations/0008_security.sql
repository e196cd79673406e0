-- 0008_security: who may do what. Roles, the API running as its owner, row-level security, and the rows a
-- job trains on read at submit time in the caller's session with the caller's rights (the worker never reads
-- a user's relation, so it never runs a user's code). Plain SQL, idempotent, runnable with psql by an
-- administrator (a superuser, or a role with CREATEROLE that may create in this database).
--
-- Roles (cluster-wide, NOLOGIN; grant them to logins):
--   pgml_owner   owns schema pgml and everything in it; the API's SECURITY DEFINER functions run as it
--   pgml_user    may fine-tune: GRANT pgml_user TO alice;   sees and acts on its own jobs, models, logs, files
--   pgml_worker  the daemons' login: GRANT pgml_worker TO worker;   reads and writes the queue, never a
--                user's relation; not an owner, never a superuser
--   pgml_admin   every job, priority above 0, diagnostic tasks: GRANT pgml_admin TO ops;   (a pgml_user too)

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgml_owner', 'pgml_user', 'pgml_worker', 'pgml_admin'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of this cluster (or a concurrent migration) created it
        END;
    END LOOP;
END $$;
DO $$
BEGIN
    -- the migrating role hands every object to pgml_owner, which needs it to be a member (a superuser is).
    -- PostgreSQL 16+: a CREATEROLE role that created pgml_owner holds it with ADMIN only (no SET), which is not
    -- enough to give it objects: ask for SET (and INHERIT) explicitly.
    IF pg_catalog.current_setting('server_version_num')::int >= 160000 THEN
        IF NOT pg_has_role(current_user, 'pgml_owner', 'SET') THEN
            EXECUTE format('GRANT pgml_owner TO %I WITH SET TRUE, INHERIT TRUE', current_user);
        END IF;
    ELSIF NOT pg_has_role(current_user, 'pgml_owner', 'MEMBER') THEN
        EXECUTE format('GRANT pgml_owner TO %I', current_user);
    END IF;
END $$;

-- ---- new columns ----------------------------------------------------------------------------------------
ALTER TABLE pgml.projects ADD COLUMN IF NOT EXISTS owner name NOT NULL DEFAULT session_user;
ALTER TABLE pgml.projects DROP CONSTRAINT IF EXISTS projects_name_key;
DO $$
BEGIN
    ALTER TABLE pgml.projects ADD CONSTRAINT projects_owner_name_key UNIQUE (owner, name);
EXCEPTION WHEN duplicate_table OR duplicate_object THEN
    NULL;
END $$;
ALTER TABLE pgml.models ADD COLUMN IF NOT EXISTS owner name NOT NULL DEFAULT session_user;
UPDATE pgml.models m SET owner = p.owner FROM pgml.projects p WHERE p.id = m.project_id AND m.owner <> p.owner;

ALTER TABLE pgml.jobs ALTER COLUMN submitted_by SET DEFAULT session_user;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS snapshot_columns text[];  -- the columns copied, in order
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS snapshot_rows bigint;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS keep_snapshot boolean NOT NULL DEFAULT false;
ALTER TABLE pgml.jobs DROP CONSTRAINT IF EXISTS jobs_status_check;
ALTER TABLE pgml.jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('submitting', 'queued', 'running', 'succeeded', 'failed', 'cancelled'));
CREATE INDEX IF NOT EXISTS jobs_submitting_idx ON pgml.jobs (submitted_by, id) WHERE status = 'submitting';
CREATE INDEX IF NOT EXISTS jobs_running_submitter_idx ON pgml.jobs (submitted_by) WHERE status = 'running';

-- Per-role limits, read at submit time (a login's own row, else pgml_user's; pgml_admin members without a row of
-- their own have none). NULL = no limit. Administrators change them: UPDATE pgml.role_limits SET ... .
CREATE TABLE IF NOT EXISTS pgml.role_limits (
    role                 name PRIMARY KEY,
    max_queued           integer,   -- jobs waiting in the queue at once
    max_running          integer,   -- jobs running at once (a job over it waits in the queue)
    max_snapshot_bytes   bigint,    -- the rows one job copies at submit time
    max_runtime          interval,  -- from a job's first claim; a job over it is stopped and failed
    max_checkpoint_bytes bigint     -- the checkpoints one job keeps in PostgreSQL
);
INSERT INTO pgml.role_limits (role, max_queued, max_running, max_snapshot_bytes, max_runtime, max_checkpoint_bytes)
VALUES ('pgml_user', 100, 4, 2000000000, interval '7 days', 20000000000)
ON CONFLICT (role) DO NOTHING;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS max_running integer;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS max_runtime interval;
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS max_checkpoint_bytes bigint;

ALTER TABLE pgml.tasks ADD COLUMN IF NOT EXISTS admin_only boolean NOT NULL DEFAULT false;
UPDATE pgml.tasks SET admin_only = (name = 'noop');

-- The rows a job trains on, copied by pgml.tune() in the caller's transaction with the caller's rights: one
-- consistent snapshot per job. Deleted when the job ends, unless tune(materialize_snapshot => true) kept it.
-- No foreign key and no primary key: a per-row foreign-key check made the copy ~2x slower than the
-- INSERT ... SELECT it is. One index on job_id finds a job's rows; the jobs triggers delete them (job
-- finished, or deleted).
CREATE TABLE IF NOT EXISTS pgml.job_rows (
    job_id bigint NOT NULL,
    n      bigint NOT NULL,
    v      text[] NOT NULL
);
CREATE INDEX IF NOT EXISTS job_rows_job_idx ON pgml.job_rows (job_id);

-- Model files: COPY (the workers' bulk path) cannot write into a table with row-level security, so the parts live
-- in pgml.file_parts, which only the workers and the owner touch; pgml.files is the view users read, showing
-- the files of the models each may read (security_barrier: no function of a user's sees another's rows).
DO $$
BEGIN
    IF to_regclass('pgml.file_parts') IS NULL THEN
        ALTER TABLE pgml.files RENAME TO file_parts;
    END IF;
END $$;

DROP FUNCTION IF EXISTS pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean, integer,
                                  integer);

-- ---- row-level security: users see their own, workers and administrators all --------------------------
ALTER TABLE pgml.projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.models ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.job_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.job_rows ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.worker_keys ENABLE ROW LEVEL SECURITY;

DO $$
DECLARE
    t text;
BEGIN
    -- the workers serve every user's jobs
    FOREACH t IN ARRAY ARRAY['projects', 'models', 'jobs', 'logs', 'job_events', 'checkpoints', 'job_rows',
                             'worker_keys'] LOOP
        EXECUTE format('DROP POLICY IF EXISTS worker_all ON pgml.%I', t);
        EXECUTE format('CREATE POLICY worker_all ON pgml.%I TO pgml_worker USING (true) WITH CHECK (true)', t);
        EXECUTE format('DROP POLICY IF EXISTS user_read ON pgml.%I', t);
    END LOOP;
END $$;
CREATE POLICY user_read ON pgml.projects FOR SELECT TO pgml_user
    USING (owner = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
CREATE POLICY user_read ON pgml.models FOR SELECT TO pgml_user
    USING (owner = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
CREATE POLICY user_read ON pgml.jobs FOR SELECT TO pgml_user
    USING (submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));
CREATE POLICY user_read ON pgml.logs FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.models m WHERE m.id = logs.model_id));
CREATE POLICY user_read ON pgml.job_events FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = job_events.job_id));
CREATE POLICY user_read ON pgml.checkpoints FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = checkpoints.job_id));
CREATE POLICY user_read ON pgml.job_rows FOR SELECT TO pgml_user
    USING (EXISTS (SELECT 1 FROM pgml.jobs j WHERE j.id = job_rows.job_id));
-- pgml.tune() copies the caller's rows into its own job, only while that job is being submitted; the subquery
-- is evaluated once per statement, not per row
DROP POLICY IF EXISTS user_submit ON pgml.job_rows;
CREATE POLICY user_submit ON pgml.job_rows FOR INSERT TO pgml_user
    WITH CHECK (job_id = (SELECT max(j.id) FROM pgml.jobs j
                          WHERE j.status = 'submitting' AND j.submitted_by = session_user));

INSERT INTO pgml.schema_migrations (version) VALUES ('0008_security') ON CONFLICT DO NOTHING;
