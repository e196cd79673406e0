-- 0027_gangs: jobs across several hosts. hyperparams.resources.nodes = N (N > 1) runs the job's ranks on N workers
-- at once, a gang (pgml_tuned/worker/gang.py tells the whole story):
--   * the first worker to claim the job (claim_job, as any job) is its leader, node 0: it records the rendezvous
--     address of the attempt (host:port, where its rank 0 hosts torch.distributed's store) in jobs.rendezvous and
--     opens the gang: jobs.gang_needed = N - 1, and a NOTIFY on pgml_jobs {"type": "gang_forming"} (a hint only).
--   * idle workers join it (gang_join in queries.sql: one statement takes the next node number, FOR UPDATE SKIP
--     LOCKED): a row of pgml.gang_members each, with the sha256 of its own child ticket.
--   * once gang_needed is 0 every member starts its ranks; the leader's rank 0 alone writes the job's logs,
--     checkpoints, files and final commit (its job ticket, as for one host). A member's ticket only reads: the
--     job's rows, the models its submitter may start from, its stored checkpoints (pgml._child_reader below).
--   * a gang that does not form within the leader's gang_seconds is given back untouched (queued again; nothing
--     counted against max_attempts), or failed when fewer live workers are registered than it needs.
--   * each member reports how its ranks ended on its row; the leader settles the job for the whole gang.
-- Plain SQL, idempotent, runnable with psql by an administrator.

ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS rendezvous text;               -- the leader's host:port, per attempt
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS gang_needed integer NOT NULL DEFAULT 0;  -- members still to join
-- what a worker looks for when it joins gangs: a handful of rows at most
CREATE INDEX IF NOT EXISTS jobs_gang_forming ON pgml.jobs (priority DESC, id) WHERE gang_needed > 0 AND status = 'running';

CREATE TABLE IF NOT EXISTS pgml.gang_members (
    job_id       bigint NOT NULL REFERENCES pgml.jobs (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    node         integer NOT NULL CHECK (node >= 1),          -- the leader (node 0) is jobs.worker
    worker       text NOT NULL,
    child_ticket bytea,                                       -- sha256 of the member's child ticket
    joined_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    outcome      text CHECK (outcome IN ('ok', 'error', 'stopped')),  -- NULL while its ranks run
    error        text,
    error_at     double precision,                            -- epoch seconds its launcher saw the first error
    PRIMARY KEY (job_id, attempt, node),
    UNIQUE (job_id, attempt, worker)
);
REVOKE ALL ON pgml.gang_members FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgml.gang_members TO pgml_worker;
GRANT SELECT ON pgml.gang_members TO pgml_admin;  -- ops watch the gangs beside the queue

-- ---- hyperparams.resources.nodes: now up to 16 hosts ----------------------------------------------------------
CREATE OR REPLACE FUNCTION pgml._check_resources(hyperparams jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r jsonb;
    k text;
    v jsonb;
    n numeric;
    caps constant jsonb := '{"gpus": 64, "procs": 64, "nodes": 16}';
    example constant text := 'e.g. "resources": {"gpus": 4} (one rank per GPU), {"procs": 2} (CPU ranks), '
                             '{"nodes": 2, "gpus": 8} (8 GPUs on each of 2 workers)';
BEGIN
    IF hyperparams IS NULL OR pg_catalog.jsonb_typeof(hyperparams) <> 'object' OR NOT hyperparams ? 'resources' THEN
        RETURN;  -- pgml._submit names a hyperparams that is not an object
    END IF;
    r := hyperparams -> 'resources';
    IF pg_catalog.jsonb_typeof(r) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources must be a JSON object, got a JSON %s',
                                             pg_catalog.jsonb_typeof(r)), HINT = example;
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM pg_catalog.jsonb_each(r) AS e LOOP
        IF NOT caps ? k THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('unknown key hyperparams.resources.%s', k), HINT = 'the keys of hyperparams.resources are gpus, procs and nodes; ' || example;
        END IF;
        IF pg_catalog.jsonb_typeof(v) <> 'number' THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s must be a positive whole number, got a JSON %s',
                                                 k, pg_catalog.jsonb_typeof(v)), HINT = example;
        END IF;
        n := (v #>> '{}')::numeric;
        IF n <> pg_catalog.trunc(n) OR n < 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s must be a positive whole number, not %s',
                                                 k, v), HINT = example;
        END IF;
        IF n > (caps ->> k)::numeric THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = pg_catalog.format('hyperparams.resources.%s = %s is more than the most a job may ask '
                                                 'for (%s)', k, v, caps ->> k), HINT = example;
        END IF;
    END LOOP;
    IF r ? 'gpus' AND r ? 'procs' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value', MESSAGE = 'hyperparams.resources gives both gpus and procs', HINT = 'give "gpus" (one rank per GPU) or "procs" (ranks on CPUs), not both';
    END IF;
END $$;

-- ---- why a job does not move: also a gang bigger than the fleet ------------------------------------------------
-- What no live worker can run: `gpus` devices on one worker, on `nodes` workers at once. NULL when the fleet can.
CREATE OR REPLACE FUNCTION pgml._fleet_shortfall(gpus integer, nodes integer) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_live bigint;
    v_able bigint;
    v_most integer;
BEGIN
    SELECT count(*), max(w.gpus), count(*) FILTER (WHERE w.gpus >= _fleet_shortfall.gpus)
    INTO v_live, v_most, v_able
    FROM pgml.worker_status w WHERE w.state IN ('live', 'late');
    IF v_live = 0 THEN
        RETURN 'no live pgml-tuned worker is registered (pgml.worker_status)';
    END IF;
    IF _fleet_shortfall.gpus > coalesce(v_most, 0) THEN
        RETURN format('it asks for %s GPU%s and no live worker has that many (%s live, the most GPUs on one: %s)',
                      _fleet_shortfall.gpus, CASE WHEN _fleet_shortfall.gpus = 1 THEN '' ELSE 's' END, v_live,
                      coalesce(v_most, 0));
    END IF;
    IF coalesce(_fleet_shortfall.nodes, 1) > v_able THEN
        RETURN format('it asks for %s workers at once (resources.nodes) and %s live worker%s could run %s part',
                      _fleet_shortfall.nodes, v_able, CASE WHEN v_able = 1 THEN '' ELSE 's' END,
                      CASE WHEN v_able = 1 THEN 'its' ELSE 'a' END);
    END IF;
    RETURN NULL;
END $$;


CREATE OR REPLACE FUNCTION pgml._wait_advice(job_id bigint) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v pgml.jobs;
    v_gpus integer;
    v_nodes integer;
    v_why text;
    v_holder record;
BEGIN
    SELECT * INTO v FROM pgml.jobs j WHERE j.id = _wait_advice.job_id;
    IF NOT FOUND OR NOT (v.submitted_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER')
                         OR pg_has_role(session_user, 'pgml_worker', 'MEMBER')) THEN
        RETURN NULL;
    END IF;
    v_gpus := coalesce((v.hyperparams -> 'resources' ->> 'gpus')::integer, 0);
    v_nodes := coalesce((v.hyperparams -> 'resources' ->> 'nodes')::integer, 1);
    IF v.status = 'queued' OR (v.status = 'running' AND v.gang_needed > 0) THEN
        v_why := pgml._fleet_shortfall(v_gpus, v_nodes);
        -- with no worker at all, say so once the job has waited a little (a daemon may be starting)
        IF v_why IS NOT NULL AND (v_gpus > 0 OR v_nodes > 1
                                  OR pg_catalog.clock_timestamp() - v.updated_at > interval '5 seconds') THEN
            RETURN format('job %s is %s, but %s: it waits until %s (pgml-tuned serve%s)',
                          v.id, CASE WHEN v.status = 'queued' THEN 'queued' ELSE 'forming its gang' END, v_why,
                          CASE WHEN v_nodes > 1 THEN format('%s workers are free at once', v_nodes)
                               ELSE 'one starts' END,
                          CASE WHEN v_gpus > 0 THEN format(' --gpus on a host with %s', v_gpus) END);
        END IF;
        IF v.status = 'running' THEN
            RETURN format('job %s is forming its gang: %s of %s workers joined; it starts when %s more join%s',
                          v.id, v_nodes - v.gang_needed, v_nodes, v.gang_needed,
                          CASE WHEN v.gang_needed = 1 THEN 's' ELSE '' END);
        END IF;
    ELSIF v.status = 'running' AND v.lease_expires_at < pg_catalog.clock_timestamp() THEN
        IF NOT EXISTS (SELECT 1 FROM pgml.worker_status w WHERE w.state IN ('live', 'late')) THEN
            SELECT w.state, w.heartbeat_at INTO v_holder FROM pgml.worker_status w WHERE w.id = v.worker;
            RETURN format('job %s: its worker %s stopped heartbeating (last heartbeat %s, lease expired %s) and no '
                          'live worker is left to take it over: it resumes (attempt %s of %s) when a worker starts '
                          '(pgml-tuned serve)', v.id, v.worker, coalesce(v_holder.heartbeat_at, v.heartbeat_at),
                          v.lease_expires_at, v.attempt + 1, v.max_attempts);
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- pgml.tune: resources checked (nothing queued on a bad value), a NOTICE when the fleet could not run it now
CREATE OR REPLACE FUNCTION pgml._jobs_resources_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    v_why text;
BEGIN
    SELECT * INTO r FROM pgml._job_resources(NEW.hyperparams);  -- raises on a bad value
    IF TG_WHEN = 'AFTER' AND (r.gpus > 0 OR r.nodes > 1) THEN
        v_why := pgml._fleet_shortfall(r.gpus, r.nodes);
        IF v_why IS NOT NULL THEN
            RAISE NOTICE USING MESSAGE = format('job %s is queued, but %s', NEW.id, v_why),
                HINT = CASE WHEN r.nodes > 1 THEN
                    format('it waits until %s workers%s are free at once (pgml-tuned serve on each host); '
                           'SELECT * FROM pgml.worker_status shows the fleet', r.nodes,
                           CASE WHEN r.gpus > 0 THEN format(' with %s GPU%s each', r.gpus,
                                                            CASE WHEN r.gpus = 1 THEN '' ELSE 's' END) ELSE '' END)
                ELSE
                    format('it waits until a worker with %s GPU%s starts (pgml-tuned serve --gpus ...); '
                           'SELECT * FROM pgml.worker_status shows the fleet', r.gpus,
                           CASE WHEN r.gpus = 1 THEN '' ELSE 's' END) END;
        END IF;
    END IF;
    RETURN NEW;
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

CREATE OR REPLACE FUNCTION pgml._child_rows(job_id bigint, ticket text) RETURNS SETOF text[]
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET synchronize_seqscans = off
AS $$
DECLARE
    v pgml.jobs := pgml._child_reader(_child_rows.job_id, ticket);
    k integer := coalesce(pg_catalog.cardinality(v.snapshot_columns), 8);
    v_name text := pgml._job_table(_child_rows.job_id);
BEGIN
    IF pg_catalog.to_regclass(pg_catalog.format('pgml_rows.%I', v_name)) IS NOT NULL THEN
        RETURN QUERY EXECUTE pg_catalog.format(
            'SELECT ARRAY[%s] FROM pgml_rows.%I',
            (SELECT pg_catalog.string_agg(pg_catalog.format('c%s', i), ', ' ORDER BY i)
             FROM pg_catalog.generate_series(1, k) AS i), v_name);
        RETURN;
    END IF;
    RETURN QUERY SELECT (ARRAY[r.c1, r.c2, r.c3, r.c4, r.c5, r.c6, r.c7, r.c8])[1:k]
                 FROM pgml.job_rows r WHERE r.job_id = _child_rows.job_id ORDER BY r.n;
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
               AND p.task IN ('text-classification', 'text-pair-classification', 'conversation')))
      AND pgml._may_read_model(m.owner, v_owner)
    ORDER BY (p.owner = v_owner) DESC, (m.id = pgml.deployed_model(p.id)) DESC, m.id DESC
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

-- every caller of the 1-argument form (0022) is replaced above
DROP FUNCTION IF EXISTS pgml._fleet_shortfall(integer);

SELECT pgml._own_everything();
REVOKE ALL ON FUNCTION pgml._child_reader(bigint, text), pgml._fleet_shortfall(integer, integer) FROM PUBLIC;

INSERT INTO pgml.schema_migrations (version) VALUES ('0027_gangs') ON CONFLICT DO NOTHING;
