-- Every statement the daemon and its training children run, as named blocks (`-- name: x`), loaded by
-- pgml_tuned/db.py: the worker's sent by pgml_tuned/worker/pg.py, the children's by pgml_tuned/child/store.py and
-- child/writes.py. The job state machine is documented in pgml_tuned/states.py.
-- Writes by a worker are fenced: they match the job's current `attempt`, so a worker that lost its lease
-- can never overwrite the new owner's work.

-- name: claim_job
UPDATE pgml.jobs j
SET status = 'running',
    attempt = j.attempt + 1,
    worker = %(worker)s,
    lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    heartbeat_at = clock_timestamp(),
    started_at = coalesce(j.started_at, clock_timestamp()),
    updated_at = clock_timestamp(),
    error = NULL,
    child_ticket = NULL,  -- the attempt's child gets a ticket of its own when it starts (set_child_ticket)
    rendezvous = NULL,
    gang_needed = 0
WHERE j.id = (
    SELECT q.id FROM pgml.jobs q
    WHERE q.status = 'queued' AND NOT q.cancel_requested
      -- only what this worker can run: hyperparams.resources.gpus (checked at submit, 0022_fleet) of its free GPUs
      AND coalesce((q.hyperparams -> 'resources' ->> 'gpus')::integer, 0) <= %(free_gpus)s
      -- a submitter at its max_running waits (a soft cap: two workers claiming at once may pass it by one)
      AND (q.max_running IS NULL
           OR (SELECT count(*) FROM pgml.jobs r WHERE r.status = 'running' AND r.submitted_by = q.submitted_by)
              < q.max_running)
    ORDER BY q.priority DESC, q.id
    FOR UPDATE SKIP LOCKED
    LIMIT 1
) -- committed asynchronously (0029_async_bookkeeping): lost in a server crash, the job is simply queued again;
  -- (set_config inline, not pgml._async_commit(): a function with a search_path of its own costs ~35 us a call)
  AND pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING j.id, j.attempt, j.project_id, j.model_id, j.task, j.relation_schema, j.relation_table,
          j.model_name, j.test_size, j.test_sampling, j.hyperparams, j.secrets, j.credential, j.submitted_by,
          j.snapshot_columns,
          extract(epoch FROM clock_timestamp() - j.created_at)::float8 AS queued_seconds,
          (SELECT name FROM pgml.projects p WHERE p.id = j.project_id) AS project_name,
          -- the hub allow-list may have changed since the job was submitted: checked again at every claim
          (SELECT h.error FROM pgml._hub_refusal(j.model_name, j.submitted_by, j.task) h) AS hub_refusal;

-- name: gang_open
-- The leader of a job across several workers (resources.nodes, 0027_gangs) records where its rank 0 hosts the
-- rendezvous, and the attempt's rendezvous secret where only the workers read it (pgml.gang_secrets, 0034), and
-- opens the gang; the NOTIFY only wakes idle workers (they read the rows).
WITH opened AS (
    UPDATE pgml.jobs
    SET rendezvous = %(rendezvous)s, gang_needed = %(nodes)s - 1, updated_at = clock_timestamp()
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING id, attempt
), secret AS (
    INSERT INTO pgml.gang_secrets (job_id, attempt, secret)
    SELECT id, attempt, %(secret)s FROM opened
    ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, secret = EXCLUDED.secret
)
SELECT id, pg_notify('pgml_jobs', '{"type": "gang_forming"}') IS NOT NULL AS notified
FROM opened;

-- name: gang_join
-- Join the next forming gang this worker can take a part of (its free GPUs; never one it is already in): one
-- statement takes the node number (FOR UPDATE SKIP LOCKED) and writes the member's row. Returns the job as
-- claim_job does, with the node and the rendezvous.
WITH found AS (
    SELECT q.id FROM pgml.jobs q
    WHERE q.gang_needed > 0 AND q.status = 'running' AND NOT q.cancel_requested
      AND q.worker IS DISTINCT FROM %(worker)s
      AND coalesce((q.hyperparams -> 'resources' ->> 'gpus')::integer, 0) <= %(free_gpus)s
      AND NOT EXISTS (SELECT 1 FROM pgml.gang_members m
                      WHERE m.job_id = q.id AND m.attempt = q.attempt AND m.worker = %(worker)s)
    ORDER BY q.priority DESC, q.id
    FOR UPDATE SKIP LOCKED
    LIMIT 1
), joined AS (
    UPDATE pgml.jobs j SET gang_needed = j.gang_needed - 1
    FROM found WHERE j.id = found.id
    RETURNING j.*
), member AS (
    INSERT INTO pgml.gang_members (job_id, attempt, node, worker)
    SELECT id, attempt, coalesce((hyperparams -> 'resources' ->> 'nodes')::integer, 1) - 1 - gang_needed, %(worker)s
    FROM joined
    RETURNING job_id, node
)
SELECT j.id, j.attempt, j.project_id, j.model_id, j.task, j.relation_schema, j.relation_table,
       j.model_name, j.test_size, j.test_sampling, j.hyperparams, j.secrets, j.credential, j.submitted_by,
       j.snapshot_columns, j.rendezvous, m.node, j.gang_needed AS gang_needed_after,
       (SELECT s.secret FROM pgml.gang_secrets s WHERE s.job_id = j.id AND s.attempt = j.attempt)
           AS rendezvous_secret,
       (SELECT name FROM pgml.projects p WHERE p.id = j.project_id) AS project_name,
       (SELECT h.error FROM pgml._hub_refusal(j.model_name, j.submitted_by, j.task) h) AS hub_refusal
FROM joined j JOIN member m ON m.job_id = j.id;

-- name: gang_notify
-- More members wanted: wake idle workers (the payload names no job: anyone may LISTEN on pgml_jobs).
SELECT pg_notify('pgml_jobs', '{"type": "gang_forming"}');

-- name: gang_state
-- How a job's gang stands for one attempt (the leader and its members poll it while the gang forms).
SELECT j.status, j.attempt, j.gang_needed, j.cancel_requested,
       coalesce((j.hyperparams -> 'resources' ->> 'nodes')::integer, 1) AS nodes
FROM pgml.jobs j WHERE j.id = %(id)s;

-- name: gang_give_back
-- A gang that did not form in time: the job goes back to the queue untouched (nothing counted against
-- max_attempts), the members' rows go. Matches nothing once the gang is complete (a last member joined first).
WITH back AS (
    UPDATE pgml.jobs
    SET status = 'queued', worker = NULL, lease_expires_at = NULL, rendezvous = NULL, gang_needed = 0,
        child_ticket = NULL, updated_at = clock_timestamp()
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running' AND gang_needed > 0
    RETURNING id, attempt
), gone AS (
    DELETE FROM pgml.gang_members m USING back WHERE m.job_id = back.id AND m.attempt = back.attempt
), secret AS (
    DELETE FROM pgml.gang_secrets s USING back WHERE s.job_id = back.id
)
SELECT id FROM back;

-- name: gang_live_workers
-- Live workers that could each run a part of the job (its GPUs): whether a gang of `nodes` can ever form now.
SELECT count(*)::integer AS able
FROM pgml.worker_status w
WHERE w.state IN ('live', 'late') AND w.gpus >= %(gpus)s;

-- name: gang_set_ticket
UPDATE pgml.gang_members m SET child_ticket = %(hash)s, heartbeat_at = clock_timestamp()
FROM pgml.jobs j
WHERE m.job_id = %(id)s AND m.attempt = %(attempt)s AND m.node = %(node)s
  AND j.id = m.job_id AND j.attempt = m.attempt AND j.status = 'running'
RETURNING m.job_id;

-- name: gang_member_beat
-- A member's heartbeat (every heartbeat_seconds): renews its row; returns the ones whose job still runs this attempt.
UPDATE pgml.gang_members m SET heartbeat_at = clock_timestamp()
FROM pgml.jobs j, unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS a (id, attempt)
WHERE m.job_id = a.id AND m.attempt = a.attempt AND m.worker = %(worker)s
  AND j.id = m.job_id AND j.attempt = m.attempt AND j.status = 'running'
  AND pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING m.job_id AS id;

-- name: gang_member_end
-- How a member's ranks ended: ok, error (with its launcher's error and when it saw it) or stopped.
UPDATE pgml.gang_members
SET outcome = %(outcome)s, error = %(error)s, error_at = %(error_at)s, heartbeat_at = clock_timestamp()
WHERE job_id = %(id)s AND attempt = %(attempt)s AND node = %(node)s
RETURNING job_id;

-- name: gang_members
-- The leader's view of its gang: each member's outcome, and how long its worker has not renewed its row.
SELECT m.node, m.worker, m.outcome, m.error, m.error_at,
       extract(epoch FROM clock_timestamp() - m.heartbeat_at)::float8 AS silent_seconds
FROM pgml.gang_members m
WHERE m.job_id = %(id)s AND m.attempt = %(attempt)s
ORDER BY m.node;

-- name: gang_lost
-- A member of the gang died (its worker stopped heartbeating, or never reported how its ranks ended): the attempt
-- is lost as if the job's own worker had died (reap_expired): requeued, or failed after max_attempts lost ones.
UPDATE pgml.jobs j
SET failed_attempts = j.failed_attempts + 1,
    status = CASE WHEN j.failed_attempts + 1 >= j.max_attempts THEN 'failed' ELSE 'queued' END,
    errors = j.errors || jsonb_build_object('attempt', j.attempt, 'worker', j.worker, 'at', clock_timestamp(),
                                            'error', %(error)s::text),
    error = CASE WHEN j.failed_attempts + 1 >= j.max_attempts THEN
        format('gave up after %%s attempts: %%s', j.failed_attempts + 1, %(error)s::text) END,
    finished_at = CASE WHEN j.failed_attempts + 1 >= j.max_attempts THEN clock_timestamp() END,
    lease_expires_at = NULL,
    worker = NULL,
    updated_at = clock_timestamp()
WHERE j.id = %(id)s AND j.attempt = %(attempt)s AND j.status = 'running'
RETURNING j.id, j.status;

-- name: renew_leases
-- One statement renews every running attempt of a worker (parallel arrays of job ids and attempts); a job that
-- is missing from the result has lost its lease.
UPDATE pgml.jobs j
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    heartbeat_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS a (id, attempt)
WHERE j.id = a.id AND j.attempt = a.attempt AND j.status = 'running'
  AND pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING j.id, j.cancel_requested,
          coalesce(clock_timestamp() - j.started_at > j.max_runtime, false) AS overtime;

-- name: reap_expired
-- A lease that ran out while the server itself was down is no sign of a dead worker: after a restart, every
-- worker gets one full lease (its lease_seconds) of server uptime to reconnect and renew before its job is reaped.
WITH expired AS (
    SELECT id FROM pgml.jobs
    WHERE status = 'running' AND lease_expires_at < clock_timestamp()
      AND pg_postmaster_start_time() + coalesce(lease_expires_at - heartbeat_at, interval '0') < clock_timestamp()
    FOR UPDATE SKIP LOCKED
)
UPDATE pgml.jobs j
SET failed_attempts = j.failed_attempts + 1,
    status = CASE WHEN j.cancel_requested THEN 'cancelled'
                  WHEN j.failed_attempts + 1 >= j.max_attempts THEN 'failed'
                  ELSE 'queued' END,
    errors = j.errors || jsonb_build_object(
        'attempt', j.attempt, 'worker', j.worker, 'at', clock_timestamp(),
        'error', format('worker %s stopped renewing its lease (killed, crashed or cut off); last heartbeat %s',
                        j.worker, j.heartbeat_at)),
    error = CASE WHEN j.failed_attempts + 1 >= j.max_attempts AND NOT j.cancel_requested THEN
        format('gave up after %s attempts: the worker of every attempt stopped renewing its lease '
               '(see errors); raise max_attempts to retry more', j.failed_attempts + 1) END,
    finished_at = CASE WHEN j.cancel_requested OR j.failed_attempts + 1 >= j.max_attempts
                       THEN clock_timestamp() END,
    lease_expires_at = NULL,
    worker = NULL,
    updated_at = clock_timestamp()
FROM expired
WHERE j.id = expired.id AND pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING j.id, j.status, j.attempt;

-- name: fail_job
UPDATE pgml.jobs
SET status = 'failed',
    error = %(error)s,
    errors = errors || jsonb_build_object('attempt', attempt, 'worker', worker, 'error', %(error)s::text,
                                          'at', clock_timestamp()),
    finished_at = clock_timestamp(),
    lease_expires_at = NULL,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: cancel_running
UPDATE pgml.jobs
SET status = 'cancelled',
    error = 'cancelled by ' || coalesce(%(by)s, 'request'),
    finished_at = clock_timestamp(),
    lease_expires_at = NULL,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: requeue_job
UPDATE pgml.jobs
SET status = 'queued',
    worker = NULL,
    lease_expires_at = NULL,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: job_credential
-- The name of the job's credential if its submitter may still use it (pgml.job_credential raises otherwise).
SELECT pgml.job_credential(%(id)s, %(attempt)s) AS credential;

-- name: job_status
SELECT status, attempt, error FROM pgml.jobs WHERE id = %(id)s;

-- name: queue_empty
-- What a draining worker still waits for: queued jobs it could run (with all its GPUs), and jobs held by a worker that stopped heartbeating (its lease
-- runs out, the poller reaps the job, and the drain takes it over) — a registered holder that is not live, or any
-- holder whose lease has already expired.
SELECT NOT EXISTS (SELECT 1 FROM pgml.jobs WHERE (status = 'queued' OR gang_needed > 0) AND NOT cancel_requested
                   AND coalesce((hyperparams -> 'resources' ->> 'gpus')::integer, 0) <= %(gpus)s)
   AND NOT EXISTS (
       SELECT 1 FROM pgml.jobs j
       WHERE j.status = 'running' AND j.worker IS DISTINCT FROM %(worker)s
         AND (j.lease_expires_at < clock_timestamp()
              OR EXISTS (SELECT 1 FROM pgml.worker_status w WHERE w.id = j.worker AND w.state <> 'live'))) AS empty;

-- name: worker_login
-- Before the daemon serves (worker/pg.py): may its login bypass row-level security? A superuser, a role with
-- BYPASSRLS, or a member of the role owning pgml's tables (pgml_owner: an owner is not subject to its tables'
-- policies) would make every user's rows the worker's to read, and a child's or the serving process's too.
SELECT current_user AS login, r.rolsuper AS superuser, r.rolbypassrls AS bypassrls,
       o.rolname AS owner,
       coalesce(o.oid IS NOT NULL AND (pg_catalog.pg_has_role(current_user, o.oid, 'MEMBER')
                                       OR pg_catalog.pg_has_role(current_user, o.oid, 'USAGE')), false) AS owns
FROM pg_catalog.pg_roles r
LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass('pgml.jobs')
LEFT JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
WHERE r.rolname = current_user;

-- name: worker_register
-- The fleet registry (0022_fleet): each daemon's own row, fenced on its token.
SELECT pgml._worker_register(%(worker)s::text, %(token)s::text, %(host)s::text, %(pid)s::integer, %(version)s::text,
                             %(devices)s::jsonb, %(gpus)s::integer, %(concurrency)s::integer,
                             %(heartbeat_seconds)s::real, %(lease_seconds)s::real, %(cpus)s::integer);

-- name: worker_heartbeat
SELECT pgml._worker_heartbeat(%(worker)s::text, %(token)s::text, %(free_slots)s::integer, %(free_gpus)s::integer,
                              %(running)s::bigint[], %(models_cached)s::jsonb, %(serving)s::jsonb) AS owned;

-- name: worker_stop
SELECT pgml._worker_stop(%(worker)s::text, %(token)s::text) AS owned;

-- name: idle_workers
-- How many live workers have a free job slot (their last heartbeat's): the herd control's fleet size.
SELECT count(*) FILTER (WHERE w.free_slots > 0)::integer AS idle, count(*)::integer AS live
FROM pgml.worker_status w WHERE w.state = 'live';

-- name: registry_exists
SELECT pg_catalog.to_regprocedure('pgml._worker_heartbeat(text, text, integer, integer, bigint[], jsonb)') IS NOT NULL
    AS found;

-- name: jobs_by_status
SELECT status, jobs FROM pgml.queue_summary;

-- name: release_orphans
-- After a claim whose reply was lost: jobs this worker claimed but does not run go back to the queue.
UPDATE pgml.jobs
SET status = 'queued', worker = NULL, lease_expires_at = NULL, updated_at = clock_timestamp()
WHERE worker = %(worker)s AND status = 'running' AND NOT (id = ANY (%(running)s::bigint[]))
RETURNING id;

-- name: set_child_ticket
-- When the attempt's child starts: the sha256 of its ticket (the child gets the ticket itself on stdin).
UPDATE pgml.jobs SET child_ticket = %(hash)s
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
  AND pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL
RETURNING id;

-- name: child_log
-- The child's statements (from here on): each a pgml._child_* function (migration 0010), refused unless the ticket
-- is the running attempt's; the file COPYs are checked row by row against the ticket the transaction began with.
-- %(logs)s is a JSON array of {"seq": n, "kind": "train"|"info"|"warning", "entry": {...}}: a batch retried after a
-- lost reply inserts nothing twice.
SELECT pgml._child_log(%(id)s, %(ticket)s, %(progress)s::jsonb, %(logs)s::jsonb) AS inserted;

-- name: child_resume
-- This attempt trains on from %(step)s: earlier attempts' training rows past it move to pgml.superseded_logs, and
-- %(entry)s becomes this attempt's info row %(seq)s, in one statement (0018_log_kinds.sql).
SELECT pgml._child_resume(%(id)s, %(ticket)s, %(step)s, %(seq)s, %(entry)s::jsonb) AS moved;

-- name: child_files_begin
-- The final transaction: locks the running attempt's job, drops its model's files of an earlier try.
SELECT pgml._child_files_begin(%(id)s, %(ticket)s) AS model_id;

-- name: copy_files
COPY pgml.file_parts (model_id, path, part, data) FROM STDIN (FORMAT BINARY);

-- name: child_succeed
SELECT pgml._child_succeed(%(id)s, %(ticket)s, %(metrics)s::jsonb, %(base_model)s) AS model_id;

-- name: child_checkpoint_begin
-- A checkpoint's transaction: locks the job, replaces a re-run step's checkpoint, returns the new one's id.
SELECT pgml._child_checkpoint_begin(%(id)s, %(ticket)s, %(step)s) AS id;

-- name: hub_refusal
-- Why the hub allow-list (pgml.hub_allowlist) refuses a model for the job's submitter; no row when it does not.
SELECT error FROM pgml._hub_refusal(%(model_name)s::text, %(owner)s::name);

-- name: copy_checkpoint_files
COPY pgml.checkpoint_files (checkpoint_id, path, part, data) FROM STDIN (FORMAT BINARY);

-- name: child_checkpoint_end
-- Counts the checkpoint's files, keeps the newest %(keep)s; what the job's checkpoints hold now against its limit.
SELECT bytes, max_bytes FROM pgml._child_checkpoint_end(%(id)s, %(ticket)s, %(checkpoint_id)s, %(keep)s);

-- name: child_rows
-- The rows pgml.tune() copied at submit time, in their order (jobs.snapshot_columns names their columns).
SELECT v FROM pgml._child_rows(%(id)s, %(ticket)s) AS v;

-- name: model_files
SELECT path, part, data FROM pgml.files WHERE model_id = %(model_id)s ORDER BY path, part;

-- name: child_model_files
SELECT path, part, data FROM pgml._child_model_files(%(id)s, %(ticket)s, %(model_id)s);

-- name: child_find_model
-- pgml:<project> → the submitter's project's latest successful model; pgml:model:<id> → that model. Only models
-- the job's submitter may read (its own, or any for an administrator): another user's is "no such model".
SELECT id, status, base_model, task, project_name FROM pgml._child_find_model(%(id)s, %(ticket)s, %(model_id)s, %(project)s);

-- name: child_latest_checkpoint
SELECT id, step, attempt, bytes FROM pgml._child_latest_checkpoint(%(id)s, %(ticket)s);

-- name: child_checkpoint_files
SELECT path, part, data FROM pgml._child_checkpoint_files(%(id)s, %(ticket)s, %(checkpoint_id)s);

-- name: dataset_begin
-- A load_dataset child's staging table for its attempt (created, owned and checked by the definer, which checks
-- the child's ticket and locks the job).
SELECT pgml._dataset_begin(%(id)s, %(ticket)s, %(names)s::text[], %(types)s::text[]) AS staging;

-- name: dataset_commit
-- Inside the child's final transaction: the staging table becomes pgml."<source>" (then child_succeed).
SELECT pgml._dataset_commit(%(id)s, %(ticket)s, %(rows)s) AS result;

-- name: claim_requests
-- The inference lane (the serving process; the functions of 0014_serving.sql).
SELECT * FROM pgml._requests_claim(%(serving_id)s, %(max_n)s, %(lease_seconds)s, %(max_inputs)s);

-- name: renew_requests
SELECT id FROM pgml._requests_renew(%(serving_id)s, %(lease_seconds)s) AS r (id);

-- name: finish_request
-- An answer (result, usage) or an error (error not NULL).
SELECT pgml._request_finish(%(id)s, %(serving_id)s, %(result)s::jsonb, %(usage)s::jsonb, %(error)s) AS owned;

-- name: answer_requests
-- A whole batch's answers in one statement (ids[i] gets results[i]); the ids still owned come back.
SELECT id FROM pgml._requests_answer(%(serving_id)s, %(ids)s::bigint[], %(results)s::jsonb[]) AS a (id);

-- name: answer_vectors
-- A batch of embed requests' vectors (0044): ids[i] gets counts[i] vectors of dim values, the next ones of flat
-- (a real[] sent in PostgreSQL's binary format: %(flat)b).
SELECT id FROM pgml._requests_answer(%(serving_id)s, %(ids)s::bigint[], NULL, %(counts)s::integer[], %(dim)s,
                                     %(flat)b) AS a (id);

-- name: unlock_requests
-- The lane's advisory locks on these requests (taken by claim_requests), once their answers are committed.
SELECT pg_catalog.pg_advisory_unlock(pgml._request_lock_space(), pgml._request_lock_key(i))
FROM pg_catalog.unnest(%(ids)s::bigint[]) AS i;

-- name: request_chunk
SELECT pgml._request_chunk(%(id)s, %(serving_id)s, %(first_seq)s, %(texts)s::text[]) AS owned;

-- name: release_requests
-- A dead serving process's requests (serving_id), or every request whose lease ran out (serving_id NULL).
SELECT id, status FROM pgml._requests_release(%(serving_id)s::text);

-- name: requests_housekeeping
-- One round trip per poll: requests whose lease ran out (any serving process's), and what nobody will read again.
WITH released AS (SELECT id, status FROM pgml._requests_release(NULL))
SELECT (SELECT pgml._requests_expire()) AS deleted,
       (SELECT coalesce(pg_catalog.jsonb_agg(released), '[]') FROM released) AS released;

-- name: serving_model
-- The stored model a request's pgml:<ref> names for its submitter (0014: only models it may read).
SELECT id, status, base_model, task, project_name FROM pgml._serving_model(%(owner)s, %(ref)s) LIMIT 1;

-- name: serving_model_files
SELECT path, part, data FROM pgml._serving_model_files(%(model_id)s);

-- name: child_predictions_begin
-- A predict_batch child's transaction: (re)creates its output table (emptied when restart), lets its COPY in.
SELECT pgml._child_predictions_begin(%(id)s, %(ticket)s, %(restart)s) AS output;

-- name: listen_probe
-- listening.listen(): a NOTIFY on a private channel, from another connection, that the listening one must see
SELECT pg_catalog.pg_notify(%(channel)s, '');

-- name: job_tables_sweep
-- The background pass over the job tables and staging tables that were in use when their job ended (a user's lock):
-- each dropped only if it is free at once (pgml._job_tables_sweep). Returns how many it dropped.
SELECT pgml._job_tables_sweep() AS dropped;
