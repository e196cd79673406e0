-- The training child's API: ticketed functions a job's child process calls (as pgml_child) to read its rows and
-- model files and to write logs, checkpoints, files and predictions.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

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

-- The transaction that stores files: the ticket, verified, is remembered for the rest of the transaction (the
-- file tables' insert trigger checks it again on every row).
CREATE OR REPLACE FUNCTION pgml._child_remember(job_id bigint, ticket text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.set_config('pgml.child_job', job_id::text, true),
           pg_catalog.set_config('pgml.child_ticket', ticket, true)
$$;

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
    -- an import this transaction began (76_imports.sql): its importer stores the files of that model only, while
    -- it is 'in_progress' (no import stays so past its COMMIT: models_import_finished)
    IF TG_TABLE_NAME = 'file_parts' AND coalesce(v_job, '') = ''
       AND pg_catalog.current_setting('pgml.import_model', true) IS NOT NULL
       AND pg_catalog.current_setting('pgml.import_model', true) <> '' THEN
        IF NOT EXISTS (SELECT 1 FROM pgml.models m
                       WHERE m.id = NEW.model_id
                         AND m.id::text = pg_catalog.current_setting('pgml.import_model', true)
                         AND m.status = 'in_progress' AND m.hyperparams ? 'import'
                         AND m.hyperparams -> 'import' ->> 'by' = pgml._submitter()::text) THEN
            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                MESSAGE = pg_catalog.format('an import may store files of the model it began only, not of model %s',
                                            NEW.model_id),
                HINT = 'pgml.import_model_begin returns the model id to store files for';
        END IF;
        RETURN NEW;
    END IF;
    IF coalesce(v_job, '') !~ '^[0-9]+$' AND NOT pg_catalog.pg_has_role(session_user, 'pgml_child', 'MEMBER') THEN
        -- a user (pgml_user may INSERT into file_parts for its imports, above): no write of its own
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('permission denied for table %s: a user stores a model''s files only in an '
                                        'import it began', TG_TABLE_NAME),
            HINT = 'pgml-tuned models import DIR --project NAME (or pgml.import_model_begin, COPY, '
                   'pgml.import_model_finish in one transaction)';
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

-- The child of a predict_batch job: (re)create its output table at the start of an attempt (restart => true
-- empties it: an attempt's rows replace an earlier attempt's), and let this transaction's COPY into it through.
-- (since 0041) an embed_batch job's table holds (key text, embedding real[]).
CREATE OR REPLACE FUNCTION pgml._child_predictions_begin(job_id bigint, ticket text, restart boolean) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v      pgml.jobs := pgml._child_job(_child_predictions_begin.job_id, ticket, true);
    v_name text := v.hyperparams ->> 'output_table';
BEGIN
    IF v.task NOT IN ('predict_batch', 'embed_batch') THEN
        RAISE EXCEPTION 'job % is not a predict_batch or embed_batch job', v.id USING ERRCODE = 'PGT01';
    END IF;
    PERFORM pgml._check_output_table(v_name, v.submitted_by);
    IF pg_catalog.to_regclass(pg_catalog.format('pgml.%I', v_name)) IS NULL THEN
        EXECUTE pg_catalog.format(CASE v.task WHEN 'embed_batch' THEN 'CREATE TABLE pgml.%I (key text, embedding real[])'
                                  ELSE 'CREATE TABLE pgml.%I (key text, label text, score double precision)' END, v_name);
        EXECUTE pg_catalog.format('CREATE TRIGGER output_child_check BEFORE INSERT ON pgml.%I '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION pgml._output_insert_check()', v_name);
        EXECUTE pg_catalog.format('REVOKE ALL ON pgml.%I FROM PUBLIC', v_name);
        EXECUTE pg_catalog.format('GRANT INSERT ON pgml.%I TO pgml_child', v_name);
    ELSIF restart THEN
        EXECUTE pg_catalog.format('TRUNCATE pgml.%I', v_name);
    END IF;
    EXECUTE pg_catalog.format('GRANT SELECT ON pgml.%I TO %I', v_name, v.submitted_by);
    INSERT INTO pgml.output_tables (name, kind, owner, job_id)
    VALUES (v_name, CASE v.task WHEN 'embed_batch' THEN 'embeddings' ELSE 'predictions' END, v.submitted_by, v.id)
    ON CONFLICT (name) DO UPDATE SET job_id = EXCLUDED.job_id, created_at = pg_catalog.clock_timestamp();
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v_name;  -- the table pgml.<v_name>
END $$;

-- BEFORE INSERT (per statement: one check per COPY) on every output table: only the running job whose table it
-- is, through the ticket its _child_predictions_begin verified in this transaction.
CREATE OR REPLACE FUNCTION pgml._output_insert_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v     pgml.jobs;
    v_job text := pg_catalog.current_setting('pgml.child_job', true);
BEGIN
    IF pg_catalog.pg_has_role(session_user, 'pgml_owner', 'MEMBER') THEN
        RETURN NULL;
    END IF;
    IF coalesce(v_job, '') !~ '^[0-9]+$' THEN
        RAISE EXCEPTION 'pgml.%: no child ticket in this transaction', TG_TABLE_NAME USING ERRCODE = 'PGT01';
    END IF;
    v := pgml._child_job(v_job::bigint, pg_catalog.current_setting('pgml.child_ticket', true));
    IF v.hyperparams ->> 'output_table' IS DISTINCT FROM TG_TABLE_NAME THEN
        RAISE EXCEPTION 'job % may write its own output table only, not pgml.%', v.id, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END $$;

-- ---- the child's log rows, now with a kind ------------------------------------------------------------------
-- `logs` is a JSON array of {"seq": n, "kind": "train"|"info"|"warning", "entry": {...}} (kind defaults to train):
-- a batch retried after a lost reply inserts nothing twice. Returns how many rows were new.
CREATE OR REPLACE FUNCTION pgml._child_log(job_id bigint, ticket text, progress jsonb, logs jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_log.job_id, _child_log.ticket, true);
    v_inserted bigint;
BEGIN
    IF pg_catalog.jsonb_typeof(logs) IS DISTINCT FROM 'array'
       OR pg_catalog.jsonb_typeof(progress) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log takes a JSON object of progress and a JSON array of log entries';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(_child_log.logs) AS x
               WHERE coalesce(x.value ->> 'kind', 'train') NOT IN ('train', 'info', 'warning')) THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_log: a log entry''s kind is train, info or warning';
    END IF;
    UPDATE pgml.jobs j SET progress = j.progress || _child_log.progress, updated_at = pg_catalog.clock_timestamp()
    WHERE j.id = v.id;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, kind, logs)
    SELECT v.model_id, v.project_id, v.id, v.attempt, (x.value ->> 'seq')::integer,
           coalesce(x.value ->> 'kind', 'train'), x.value -> 'entry'
    FROM pg_catalog.jsonb_array_elements(_child_log.logs) WITH ORDINALITY AS x (value, n)
    ORDER BY x.n
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    RETURN v_inserted;
END $$;

-- ---- a resume: earlier attempts' rows past its step move apart, atomically with the row that says so ---------------
-- The attempt of this ticket starts training from step `step` (a checkpoint's; 0: from the start). Moves the
-- training rows of earlier attempts with a step past it, and their summary rows (train_runtime: an interrupted
-- attempt's, not the end), into pgml.superseded_logs, and stores `entry` (an info row, {"message": ...}) as this
-- attempt's log row `seq`. A call retried after a lost reply moves nothing more and stores nothing twice. Returns
-- how many rows it moved.
CREATE OR REPLACE FUNCTION pgml._child_resume(job_id bigint, ticket text, step bigint, seq integer, entry jsonb)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v pgml.jobs := pgml._child_job(_child_resume.job_id, _child_resume.ticket, true);
    v_moved bigint;
BEGIN
    IF pg_catalog.jsonb_typeof(_child_resume.entry) IS DISTINCT FROM 'object' OR _child_resume.step IS NULL
       OR _child_resume.step < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgml._child_resume takes a step >= 0 and a JSON object (the info row)';
    END IF;
    WITH moved AS (
        DELETE FROM pgml.logs l
        WHERE l.job_id = v.id AND l.attempt < v.attempt AND l.kind = 'train'
          AND (pg_catalog.jsonb_exists(l.logs, 'train_runtime')
               OR (pg_catalog.jsonb_typeof(l.logs -> 'step') = 'number'
                   AND (l.logs ->> 'step')::numeric > _child_resume.step))
        RETURNING l.*
    )
    INSERT INTO pgml.superseded_logs (id, model_id, project_id, job_id, attempt, seq, created_at, kind, logs,
                                      superseded_by, resumed_from_step)
    SELECT m.id, m.model_id, m.project_id, m.job_id, m.attempt, m.seq, m.created_at, m.kind, m.logs,
           v.attempt, _child_resume.step
    FROM moved m;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, kind, logs)
    VALUES (v.model_id, v.project_id, v.id, v.attempt, _child_resume.seq, 'info',
            _child_resume.entry || pg_catalog.jsonb_build_object(
                'superseded', v_moved,
                'message', coalesce(_child_resume.entry ->> 'message',
                                    pg_catalog.format('training from step %s', _child_resume.step))
                           || CASE WHEN v_moved > 0 THEN pg_catalog.format(
                                  '; the %s log rows of earlier attempts past step %s are now in pgml.superseded_logs',
                                  v_moved, _child_resume.step) ELSE '' END))
    ON CONFLICT (job_id, attempt, seq) DO NOTHING;
    RETURN v_moved;
END $$;

-- (since 0019) checkpoints that upload while training goes on, and `pgml-tuned gc` (pgml.gc) for what old jobs
-- hold.
--
-- 1. A checkpoint is still stored in ONE transaction (pgml._child_checkpoint_begin, COPY of its files into
--    pgml.checkpoint_files, pgml._child_checkpoint_end): a checkpoint row exists, for a resume to pick, only once
--    all its files are in, and a child killed mid-upload leaves nothing (its transaction never commits). What
--    changes: _begin no longer locks the job row. The child now uploads on a connection of its own while the
--    Trainer goes on (child/uploader.py); a row lock held for the whole upload would stall the child's own log
--    writes (pgml._child_log locks the row too) and the worker's lease renewals until the upload commits. The
--    fence stays: _child_checkpoint_end still takes the lock and checks the ticket, at the end, for milliseconds;
--    a checkpoint of an attempt that lost the job meanwhile is rolled back there.
--
-- 2. pgml.gc(keep_last, logs_older_than, include_kept, apply): what old jobs hold, and (apply => true) frees it.
--    Only members of pgml_admin may call it; it runs as pgml_owner (users never get DELETE on these tables).
--    It lists (and frees) rows of four kinds:
--      model_files  the files (pgml.files) of a successful model that none of these keep:
--                     - its project's deployed model (pgml.deployed_model) is kept,
--                     - its project's best model by the deployment metric (pgml._key_metric) is kept,
--                     - its project's `keep_last` newest successful models (>= 1) are kept,
--                     - a model another model names as its base (base_model 'pgml:model:<id>', a LoRA adapter's),
--                       or that a queued or running job starts from (model_name 'pgml:model:<id>'), is kept.
--                   The model's row, metrics and logs stay (models.files_freed_at says when its files went).
--      logs         pgml.logs rows older than `logs_older_than` (NULL: none) of models whose job has ended
--      checkpoints  pgml.checkpoints of ended jobs (kept by tune(materialize_snapshot => true) unless include_kept)
--      job_rows     pgml.job_rows (the copy of the training rows) of ended jobs (same rule)
--      job_table    a job's own table of rows, pgml_rows.job_<id> (where a later migration keeps them), of an ended
--                   job (same rule) or of a job that is gone: dropped, which returns its space at once
--    Ended jobs' checkpoints and rows are normally deleted when the job ends (0008, pgml._job_changed): what gc
--    finds of them was kept on purpose, or left by an older version.
--    The space of deleted rows returns to the operating system only after VACUUM FULL of those tables (plain
--    VACUUM makes it reusable by new rows of the same table).

CREATE OR REPLACE FUNCTION pgml._child_checkpoint_begin(job_id bigint, ticket text, step bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- no row lock (see above): the ticket is checked now, and again under the lock by _child_checkpoint_end
    v pgml.jobs := pgml._child_job(_child_checkpoint_begin.job_id, ticket, false);
    v_id bigint;
BEGIN
    DELETE FROM pgml.checkpoints c WHERE c.job_id = v.id AND c.step = _child_checkpoint_begin.step;
    INSERT INTO pgml.checkpoints (job_id, attempt, step) VALUES (v.id, v.attempt, _child_checkpoint_begin.step)
    RETURNING id INTO v_id;
    PERFORM pgml._child_remember(v.id, ticket);
    RETURN v_id;
END $$;

-- ---- a gang member's child reads what the leader's reads --------------------------------------------------------
-- The running job that this ticket is the child ticket of: its running attempt's (the leader's), or one of the
-- attempt's gang members'. Only the read functions below take it; every write still needs the job's own ticket
-- (pgml._child_job). Else SQLSTATE PGT01.
CREATE OR REPLACE FUNCTION pgml._child_reader(job_id bigint, ticket text) RETURNS pgml.jobs
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs;
    v_hash bytea := pg_catalog.sha256(pg_catalog.convert_to(coalesce(ticket, ''), 'UTF8'));
BEGIN
    SELECT * INTO v FROM pgml.jobs j
    WHERE j.id = _child_reader.job_id AND j.status = 'running'
      AND (j.child_ticket = v_hash
           OR EXISTS (SELECT 1 FROM pgml.gang_members m
                      WHERE m.job_id = j.id AND m.attempt = j.attempt AND m.child_ticket = v_hash));
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PGT01',
            MESSAGE = pg_catalog.format('job %s: this ticket is not its running attempt''s', _child_reader.job_id),
            HINT = 'the attempt lost its lease or ended; a child acts only on its own running attempt';
    END IF;
    RETURN v;
END $$;

CREATE OR REPLACE FUNCTION pgml._child_find_model(job_id bigint, ticket text, model_id bigint, project text)
RETURNS TABLE (id bigint, status text, base_model text, task text, project_name text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner name := (pgml._child_reader(_child_find_model.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT m.id, m.status, m.base_model, m.task, p.name
    FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
    WHERE ((_child_find_model.model_id IS NOT NULL AND m.id = _child_find_model.model_id)
           OR (_child_find_model.model_id IS NULL AND p.name = project AND m.status = 'successful'
               AND p.task IN ('text-classification', 'text-pair-classification', 'conversation',
                              'text-embedding', 'text-ranking')))
      AND pgml._may_read_model(m.owner, v_owner)
    ORDER BY (p.owner = v_owner) DESC, (m.id = pgml._deployed_model(p.id)) DESC, m.id DESC
    LIMIT 1;
END $$;

CREATE OR REPLACE FUNCTION pgml._child_model_files(job_id bigint, ticket text, model_id bigint)
RETURNS TABLE (path text, part integer, data bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner name := (pgml._child_reader(_child_model_files.job_id, ticket)).submitted_by;
BEGIN
    RETURN QUERY
    SELECT f.path, f.part, f.data
    FROM pgml.file_parts f
    WHERE f.model_id = _child_model_files.model_id
      AND EXISTS (SELECT 1 FROM pgml.models m
                  WHERE m.id = _child_model_files.model_id AND pgml._may_read_model(m.owner, v_owner))
    ORDER BY f.path, f.part;
END $$;

CREATE OR REPLACE FUNCTION pgml._child_latest_checkpoint(job_id bigint, ticket text)
RETURNS TABLE (id bigint, step bigint, attempt integer, bytes bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._child_reader(_child_latest_checkpoint.job_id, ticket);
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
    PERFORM pgml._child_reader(_child_checkpoint_files.job_id, ticket);
    RETURN QUERY
    SELECT f.path, f.part, f.data
    FROM pgml.checkpoint_files f JOIN pgml.checkpoints c ON c.id = f.checkpoint_id
    WHERE f.checkpoint_id = _child_checkpoint_files.checkpoint_id AND c.job_id = _child_checkpoint_files.job_id
    ORDER BY f.path, f.part;
END $$;

CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text) RETURNS SETOF text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET synchronize_seqscans = off
AS $$
DECLARE
    v pgml.jobs := pgml._child_reader(_child_rows.job_id, ticket);
    k integer := coalesce(pg_catalog.cardinality(v.snapshot_columns), 8);
    v_name text := pgml._job_table(_child_rows.job_id);
    v_table regclass;
BEGIN
    v_table := pg_catalog.to_regclass(pg_catalog.format('pgml_rows.%I', v_name));
    IF v_table IS NOT NULL THEN
        RETURN QUERY EXECUTE pg_catalog.format(
            'SELECT ARRAY[%s] FROM %s%s',
            (SELECT pg_catalog.string_agg(pg_catalog.format('c%s', i), ', ' ORDER BY i)
             FROM pg_catalog.generate_series(1, k) AS i), v_table,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = v_table AND a.attname = 'n' AND NOT a.attisdropped)
                 THEN ' ORDER BY n' ELSE '' END);  -- tables of jobs submitted before 0030 have no n
        RETURN;
    END IF;
    RETURN QUERY SELECT (ARRAY[r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8])[1:k]
                 FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
END $$;

-- The child's final transaction begins without calling pgml._child_remember: its two settings are set right here. A
-- call of that function costs ~40 us (its own search_path, set and reset around two set_config calls), once per
-- job. Starts from its last definition (0010).
CREATE OR REPLACE FUNCTION pgml._child_files_begin(job_id bigint, ticket text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs := pgml._child_job(_child_files_begin.job_id, ticket, true);
BEGIN
    DELETE FROM pgml.file_parts f WHERE f.model_id = v.model_id;
    -- what pgml._child_remember sets: the file tables' insert trigger checks every row against them
    PERFORM pg_catalog.set_config('pgml.child_job', v.id::text, true),
            pg_catalog.set_config('pgml.child_ticket', ticket, true);
    RETURN v.model_id;
END $$;

CREATE OR REPLACE TRIGGER file_parts_child_check BEFORE INSERT ON pgml.file_parts
    FOR EACH ROW EXECUTE FUNCTION pgml._child_insert_check();

CREATE OR REPLACE TRIGGER checkpoint_files_child_check BEFORE INSERT ON pgml.checkpoint_files
    FOR EACH ROW EXECUTE FUNCTION pgml._child_insert_check();
