-- 0010_child: the training child's own, narrow database access, scoped to its attempt. Plain SQL, idempotent,
-- runnable with psql by an administrator.
--
-- A child runs a user's model code. Until now it connected as the worker, so a malicious model could do anything a
-- worker may: read every job's rows, write other jobs' logs, overwrite other models' files, "succeed" other jobs.
-- Now:
--   pgml_child   (NOLOGIN; granted to the children's login: GRANT pgml_child TO worker_child;) may execute the
--                pgml._child_* functions below and nothing else, plus INSERT into the two file tables, where a
--                trigger lets through only the parts of its own job.
--   a ticket     per attempt: the worker draws a random one when it starts the child, stores only its sha256 on the
--                job row (jobs.child_ticket, cleared by every claim) and hands the ticket to the child on stdin.
--                Every child function takes (job_id, ticket) and refuses (SQLSTATE PGT01) unless the job is running
--                and that ticket is its running attempt's: another job, a stale attempt, an ended job are refused.
-- The bulk paths stay COPY: reads are COPY (SELECT * FROM pgml._child_…(job, ticket)) TO STDOUT; writes COPY straight
-- into pgml.file_parts / pgml.checkpoint_files (COPY FROM cannot write into a table with row-level security), where a
-- BEFORE INSERT trigger checks each row (a part: up to 8 MB) against the ticket the transaction's _child_*_begin()
-- call verified. Nothing of a child's session is ever read by a definer function (no temp table, no user type).
--
-- pgml_worker is a member of pgml_child, so a worker without a child login of its own (child_dsn not set) still
-- runs its children through the same functions; a deployment gives the children a login of their own.

DO $$
BEGIN
    CREATE ROLE pgml_child NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another database of this cluster (or a concurrent migration) created it
END $$;
GRANT pgml_child TO pgml_worker;
GRANT USAGE ON SCHEMA pgml TO pgml_child;

-- the sha256 of the running attempt's child ticket (never the ticket itself)
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS child_ticket bytea;

-- ---- the check every child function starts with ------------------------------------------------------------
-- The running job whose child ticket this is, locked (FOR NO KEY UPDATE: only the lease owner writes) when `lock`;
-- else SQLSTATE PGT01. Not callable by anyone but the functions below (no EXECUTE granted).
CREATE OR REPLACE FUNCTION pgml._child_job(job_id bigint, ticket text, for_update boolean DEFAULT false)
RETURNS pgml.jobs
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs;
    v_hash bytea := pg_catalog.sha256(pg_catalog.convert_to(coalesce(ticket, ''), 'UTF8'));
BEGIN
    IF for_update THEN
        SELECT * INTO v FROM pgml.jobs j
        WHERE j.id = _child_job.job_id AND j.status = 'running' AND j.child_ticket = v_hash
        FOR NO KEY UPDATE;
    ELSE
        SELECT * INTO v FROM pgml.jobs j
        WHERE j.id = _child_job.job_id AND j.status = 'running' AND j.child_ticket = v_hash;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01',
            MESSAGE = pg_catalog.format('job %s: this ticket is not its running attempt''s', _child_job.job_id),
            HINT = 'the attempt lost its lease or ended; a child acts only on its own running attempt';
    END IF;
    RETURN v;
END $$;

-- The submitter of a job may start from a model (pgml:model:<id>, pgml:<project>): its own, or any for an
-- administrator. The one rule of resolving and downloading stored models.
CREATE OR REPLACE FUNCTION pgml._may_read_model(model_owner name, submitter name) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT model_owner = submitter
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                   WHERE r.rolname = submitter AND pg_catalog.pg_has_role(r.oid, 'pgml_admin', 'MEMBER'))
$$;

-- ---- reads ------------------------------------------------------------------------------------------------
-- The rows pgml.tune() copied for this job, in their order (jobs.snapshot_columns names their columns).
CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text) RETURNS SETOF text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._child_job(_child_rows.job_id, ticket);
    RETURN QUERY SELECT r.v FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
END $$;

-- pgml:<project> → the submitter's project's latest successful model; pgml:model:<id> → that model; only models
-- the job's submitter may read (another user's is "no such model").
CREATE OR REPLACE FUNCTION pgml._child_find_model(job_id bigint, ticket text, model_id bigint, project text)
RETURNS TABLE (id bigint, status text, base_model text, task text, project_name text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner name := (pgml._child_job(_child_find_model.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT m.id, m.status, m.base_model, m.task, p.name
    FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
    WHERE ((_child_find_model.model_id IS NOT NULL AND m.id = _child_find_model.model_id)
           OR (_child_find_model.model_id IS NULL AND p.name = project AND m.status = 'successful'))
      AND pgml._may_read_model(m.owner, v_owner)
    ORDER BY (p.owner = v_owner) DESC, m.id DESC
    LIMIT 1;
END $$;

-- Every part of a stored model the job's submitter may read (none of any other).
CREATE OR REPLACE FUNCTION pgml._child_model_files(job_id bigint, ticket text, model_id bigint)
RETURNS TABLE (path text, part integer, data bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner name := (pgml._child_job(_child_model_files.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT f.path, f.part, f.data
    FROM pgml.file_parts f
    WHERE f.model_id = _child_model_files.model_id
      AND EXISTS (SELECT 1 FROM pgml.models m
                  WHERE m.id = _child_model_files.model_id AND pgml._may_read_model(m.owner, v_owner))
    ORDER BY f.path, f.part;
END $$;

-- This job's latest stored checkpoint (of any attempt).
CREATE OR REPLACE FUNCTION pgml._child_latest_checkpoint(job_id bigint, ticket text)
RETURNS TABLE (id bigint, step bigint, attempt integer, bytes bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._child_job(_child_latest_checkpoint.job_id, ticket);
    RETURN QUERY
    SELECT c.id, c.step, c.attempt, c.bytes FROM pgml.checkpoints c
    WHERE c.job_id = _child_latest_checkpoint.job_id ORDER BY c.step DESC LIMIT 1;
END $$;

CREATE OR REPLACE FUNCTION pgml._child_checkpoint_files(job_id bigint, ticket text, checkpoint_id bigint)
RETURNS TABLE (path text, part integer, data bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._child_job(_child_checkpoint_files.job_id, ticket);
    RETURN QUERY
    SELECT f.path, f.part, f.data
    FROM pgml.checkpoint_files f JOIN pgml.checkpoints c ON c.id = f.checkpoint_id
    WHERE f.checkpoint_id = _child_checkpoint_files.checkpoint_id AND c.job_id = _child_checkpoint_files.job_id
    ORDER BY f.path, f.part;
END $$;

-- ---- writes -----------------------------------------------------------------------------------------------
-- Log rows and progress, in one statement. `logs` is a JSON array of {"seq": n, "entry": {...}}: a batch retried
-- after a lost reply inserts nothing twice. Returns how many rows were new.
CREATE OR REPLACE FUNCTION pgml._child_log(job_id bigint, ticket text, progress jsonb, logs jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_log.job_id, _child_log.ticket, true);
    v_inserted bigint;
BEGIN
    IF jsonb_typeof(logs) IS DISTINCT FROM 'array' OR jsonb_typeof(progress) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log takes a JSON object of progress and a JSON array of log entries';
    END IF;
    UPDATE pgml.jobs j SET progress = j.progress || _child_log.progress, updated_at = clock_timestamp()
    WHERE j.id = v.id;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, logs)
    SELECT v.model_id, v.project_id, v.id, v.attempt, (x.value ->> 'seq')::integer, x.value -> 'entry'
    FROM jsonb_array_elements(_child_log.logs) AS x
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    RETURN v_inserted;
END $$;

-- The transaction that stores files: the ticket, verified, is remembered for the rest of the transaction (the
-- file tables' insert trigger checks it again on every row).
CREATE OR REPLACE FUNCTION pgml._child_remember(job_id bigint, ticket text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.set_config('pgml.child_job', job_id::text, true),
           pg_catalog.set_config('pgml.child_ticket', ticket, true)
$$;

-- Begin the final commit: lock the job (its running attempt only), drop the model's files of an earlier try; the
-- caller then COPYs the model's files into pgml.file_parts and calls pgml._child_succeed in the same transaction.
CREATE OR REPLACE FUNCTION pgml._child_files_begin(job_id bigint, ticket text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_files_begin.job_id, ticket, true);
BEGIN
    DELETE FROM pgml.file_parts f WHERE f.model_id = v.model_id;
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v.model_id;
END $$;

CREATE OR REPLACE FUNCTION pgml._child_succeed(job_id bigint, ticket text, metrics jsonb, base_model text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_succeed.job_id, ticket, true);
BEGIN
    UPDATE pgml.jobs j
    SET status = 'succeeded', metrics = _child_succeed.metrics, finished_at = clock_timestamp(),
        lease_expires_at = NULL, child_ticket = NULL, updated_at = clock_timestamp()
    WHERE j.id = v.id;
    UPDATE pgml.models m
    SET metrics = _child_succeed.metrics, base_model = _child_succeed.base_model, updated_at = clock_timestamp()
    WHERE m.id = v.model_id;
    RETURN v.model_id;
END $$;

-- Begin storing a checkpoint of `step` (a re-run step replaces its checkpoint); the caller then COPYs its files
-- into pgml.checkpoint_files and calls pgml._child_checkpoint_end in the same transaction.
CREATE OR REPLACE FUNCTION pgml._child_checkpoint_begin(job_id bigint, ticket text, step bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_checkpoint_begin.job_id, ticket, true);
    v_id bigint;
BEGIN
    DELETE FROM pgml.checkpoints c WHERE c.job_id = v.id AND c.step = _child_checkpoint_begin.step;
    INSERT INTO pgml.checkpoints (job_id, attempt, step) VALUES (v.id, v.attempt, _child_checkpoint_begin.step)
    RETURNING id INTO v_id;
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v_id;
END $$;

-- Count the checkpoint's files, keep the newest `keep` checkpoints of the job; returns what they hold now and the
-- job's limit (the caller rolls back when it is over).
CREATE OR REPLACE FUNCTION pgml._child_checkpoint_end(job_id bigint, ticket text, checkpoint_id bigint, keep integer)
RETURNS TABLE (bytes bigint, max_bytes bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_checkpoint_end.job_id, ticket, true);
BEGIN
    UPDATE pgml.checkpoints c
    SET files = s.files, bytes = s.bytes
    FROM (SELECT count(DISTINCT f.path) AS files, coalesce(sum(length(f.data)), 0) AS bytes
          FROM pgml.checkpoint_files f WHERE f.checkpoint_id = _child_checkpoint_end.checkpoint_id) s
    WHERE c.id = _child_checkpoint_end.checkpoint_id AND c.job_id = v.id;
    DELETE FROM pgml.checkpoints c
    WHERE c.job_id = v.id
      AND c.id NOT IN (SELECT k.id FROM pgml.checkpoints k WHERE k.job_id = v.id
                       ORDER BY k.step DESC LIMIT greatest(1, keep));
    RETURN QUERY
    SELECT coalesce(sum(c.bytes), 0)::bigint, v.max_checkpoint_bytes FROM pgml.checkpoints c WHERE c.job_id = v.id;
END $$;

-- ---- the file tables take a child's rows only for its own job ---------------------------------------------------
-- BEFORE INSERT on pgml.file_parts and pgml.checkpoint_files: the row must belong to the job of the ticket this
-- transaction's _child_files_begin / _child_checkpoint_begin verified (checked again here: the settings are the
-- session's own, anyone may set them). Members of pgml_owner (the migrating administrator, a restore) pass.
CREATE OR REPLACE FUNCTION pgml._child_insert_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs;
    v_job text := pg_catalog.current_setting('pgml.child_job', true);
BEGIN
    IF pg_catalog.pg_has_role(session_user, 'pgml_owner', 'MEMBER') THEN
        RETURN NEW;
    END IF;
    IF coalesce(v_job, '') !~ '^[0-9]+$' THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01', MESSAGE = pg_catalog.format('%s: no child ticket in this transaction',
                                                                             TG_TABLE_NAME),
            HINT = 'a child stores files after pgml._child_files_begin or pgml._child_checkpoint_begin';
    END IF;
    v := pgml._child_job(v_job::bigint, pg_catalog.current_setting('pgml.child_ticket', true));
    IF TG_TABLE_NAME = 'file_parts' THEN
        IF NEW.model_id IS DISTINCT FROM v.model_id THEN
            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                MESSAGE = pg_catalog.format('job %s may store files of its own model (%s) only, not of model %s',
                                            v.id, v.model_id, NEW.model_id);
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM pgml.checkpoints c WHERE c.id = NEW.checkpoint_id AND c.job_id = v.id) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('job %s may store files of its own checkpoints only, not of checkpoint %s',
                                        v.id, NEW.checkpoint_id);
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS file_parts_child_check ON pgml.file_parts;
CREATE TRIGGER file_parts_child_check BEFORE INSERT ON pgml.file_parts
    FOR EACH ROW EXECUTE FUNCTION pgml._child_insert_check();
DROP TRIGGER IF EXISTS checkpoint_files_child_check ON pgml.checkpoint_files;
CREATE TRIGGER checkpoint_files_child_check BEFORE INSERT ON pgml.checkpoint_files
    FOR EACH ROW EXECUTE FUNCTION pgml._child_insert_check();

-- noop (a diagnostic task for administrators) reports who its child runs as and whether it can read the files
-- named in hyperparams.probe (never their contents): the way to check a worker's sandbox, e.g. its key file
UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['probe'] WHERE name = 'noop' AND NOT 'probe' = ANY (hyperparams);

-- ---- ownership and privileges ---------------------------------------------------------------------------
SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._child_job(bigint, text, boolean), pgml._may_read_model(name, name),
    pgml._child_remember(bigint, text), pgml._child_insert_check() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgml._child_rows(bigint, text), pgml._child_find_model(bigint, text, bigint, text),
    pgml._child_model_files(bigint, text, bigint), pgml._child_latest_checkpoint(bigint, text),
    pgml._child_checkpoint_files(bigint, text, bigint), pgml._child_log(bigint, text, jsonb, jsonb),
    pgml._child_files_begin(bigint, text), pgml._child_succeed(bigint, text, jsonb, text),
    pgml._child_checkpoint_begin(bigint, text, bigint), pgml._child_checkpoint_end(bigint, text, bigint, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgml._child_rows(bigint, text), pgml._child_find_model(bigint, text, bigint, text),
    pgml._child_model_files(bigint, text, bigint), pgml._child_latest_checkpoint(bigint, text),
    pgml._child_checkpoint_files(bigint, text, bigint), pgml._child_log(bigint, text, jsonb, jsonb),
    pgml._child_files_begin(bigint, text), pgml._child_succeed(bigint, text, jsonb, text),
    pgml._child_checkpoint_begin(bigint, text, bigint), pgml._child_checkpoint_end(bigint, text, bigint, integer)
    TO pgml_child;
-- the bulk write path: COPY into the file tables, every row checked by the trigger above (no SELECT, no DELETE)
GRANT INSERT ON pgml.file_parts, pgml.checkpoint_files TO pgml_child;
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO pgml_child', pg_get_serial_sequence('pgml.file_parts', 'id'));
END $$;

-- What only the child needed, the worker no longer has: it claims, renews, settles and reaps jobs (pgml.jobs);
-- logs, files, checkpoints, the training rows and the model's results are the child's, through the functions above.
REVOKE INSERT ON pgml.logs FROM pgml_worker;
REVOKE SELECT, INSERT, DELETE ON pgml.file_parts, pgml.checkpoint_files FROM pgml_worker;
REVOKE SELECT, INSERT, UPDATE, DELETE ON pgml.checkpoints FROM pgml_worker;
REVOKE SELECT ON pgml.job_rows, pgml.files FROM pgml_worker;
REVOKE UPDATE ON pgml.models FROM pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0010_child') ON CONFLICT DO NOTHING;
