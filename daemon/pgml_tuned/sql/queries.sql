-- Every statement the daemon and its training children run, as named blocks (`-- name: x`), loaded by
-- pgml_tuned/db.py and run through pgml_tuned/jobs.py. The job state machine is documented in pgml_tuned/states.py.
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
    error = NULL
WHERE j.id = (
    SELECT q.id FROM pgml.jobs q
    WHERE q.status = 'queued' AND NOT q.cancel_requested
      -- a submitter at its max_running waits (a soft cap: two workers claiming at once may pass it by one)
      AND (q.max_running IS NULL
           OR (SELECT count(*) FROM pgml.jobs r WHERE r.status = 'running' AND r.submitted_by = q.submitted_by)
              < q.max_running)
    ORDER BY q.priority DESC, q.id
    FOR UPDATE SKIP LOCKED
    LIMIT 1
)
RETURNING j.id, j.attempt, j.project_id, j.model_id, j.task, j.relation_schema, j.relation_table,
          j.model_name, j.test_size, j.test_sampling, j.hyperparams, j.secrets, j.submitted_by, j.snapshot_columns,
          (SELECT name FROM pgml.projects p WHERE p.id = j.project_id) AS project_name;

-- name: renew_leases
-- One statement renews every running attempt of a worker (parallel arrays of job ids and attempts); a job that
-- is missing from the result has lost its lease.
UPDATE pgml.jobs j
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    heartbeat_at = clock_timestamp()
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS a (id, attempt)
WHERE j.id = a.id AND j.attempt = a.attempt AND j.status = 'running'
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
WHERE j.id = expired.id
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

-- name: job_status
SELECT status, attempt, error FROM pgml.jobs WHERE id = %(id)s;

-- name: queue_empty
SELECT NOT EXISTS (SELECT 1 FROM pgml.jobs WHERE status = 'queued' AND NOT cancel_requested) AS empty;

-- name: append_logs
-- The child's log writer: progress on the job row and the log rows, in one fenced statement. %(logs)s is a
-- JSON array of {"seq": n, "entry": {...}}: a batch retried after a lost reply inserts nothing twice.
WITH owner AS (
    UPDATE pgml.jobs
    SET progress = progress || %(progress)s::jsonb, updated_at = clock_timestamp()
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING id, model_id, project_id, attempt
), inserted AS (
    INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, seq, logs)
    SELECT o.model_id, o.project_id, o.id, o.attempt, (x.value ->> 'seq')::integer, x.value -> 'entry'
    FROM owner o, jsonb_array_elements(%(logs)s::jsonb) AS x
    ON CONFLICT (job_id, attempt, seq) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM owner) AS owned, (SELECT count(*) FROM inserted) AS inserted;

-- name: release_orphans
-- After a claim whose reply was lost: jobs this worker claimed but does not run go back to the queue.
UPDATE pgml.jobs
SET status = 'queued', worker = NULL, lease_expires_at = NULL, updated_at = clock_timestamp()
WHERE worker = %(worker)s AND status = 'running' AND NOT (id = ANY (%(running)s::bigint[]))
RETURNING id;

-- name: lock_owned_job
-- Taken at the start of the child's final transaction: results are written only by the lease owner.
SELECT id FROM pgml.jobs
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
FOR NO KEY UPDATE;

-- name: delete_model_files
DELETE FROM pgml.file_parts WHERE model_id = %(model_id)s;

-- name: copy_files
COPY pgml.file_parts (model_id, path, part, data) FROM STDIN (FORMAT BINARY);

-- name: succeed_job
WITH job AS (
    UPDATE pgml.jobs
    SET status = 'succeeded', metrics = %(metrics)s::jsonb, finished_at = clock_timestamp(),
        lease_expires_at = NULL, updated_at = clock_timestamp()
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING model_id
)
UPDATE pgml.models m
SET metrics = %(metrics)s::jsonb, base_model = %(base_model)s, updated_at = clock_timestamp()
FROM job WHERE m.id = job.model_id
RETURNING m.id;

-- name: job_rows
-- The rows pgml.tune() copied at submit time, in their order (jobs.snapshot_columns names their columns).
SELECT v FROM pgml.job_rows WHERE job_id = %(id)s ORDER BY n;

-- name: model_files
SELECT path, part, data FROM pgml.files WHERE model_id = %(model_id)s ORDER BY path, part;

-- name: resolve_model_ref
-- pgml:<project> → the submitter's project's latest successful model; pgml:model:<id> → that model. Only models
-- the job's submitter may read (its own, or any for an administrator): another user's is "no such model".
SELECT m.id, m.status, m.base_model, m.task, p.name AS project_name
FROM pgml.models m JOIN pgml.projects p ON p.id = m.project_id
WHERE ((%(model_id)s::bigint IS NOT NULL AND m.id = %(model_id)s::bigint)
       OR (%(model_id)s::bigint IS NULL AND p.name = %(project)s AND m.status = 'successful'))
  AND (m.owner = %(owner)s
       OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = %(owner)s AND pg_has_role(r.oid, 'pgml_admin', 'MEMBER')))
ORDER BY (p.owner = %(owner)s) DESC, m.id DESC
LIMIT 1;

-- name: delete_checkpoint_step
-- Inside the child's fenced transaction (lock_owned_job first): a re-run step replaces its checkpoint.
DELETE FROM pgml.checkpoints WHERE job_id = %(id)s AND step = %(step)s;

-- name: insert_checkpoint
INSERT INTO pgml.checkpoints (job_id, attempt, step) VALUES (%(id)s, %(attempt)s, %(step)s)
RETURNING id;

-- name: copy_checkpoint_files
COPY pgml.checkpoint_files (checkpoint_id, path, part, data) FROM STDIN (FORMAT BINARY);

-- name: finish_checkpoint
UPDATE pgml.checkpoints c
SET files = s.files, bytes = s.bytes
FROM (SELECT count(DISTINCT path) AS files, coalesce(sum(length(data)), 0) AS bytes
      FROM pgml.checkpoint_files WHERE checkpoint_id = %(checkpoint_id)s) s
WHERE c.id = %(checkpoint_id)s;

-- name: checkpoint_budget
-- Inside the checkpoint's transaction: what the job's checkpoints hold now, against its limit.
SELECT coalesce(sum(c.bytes), 0)::bigint AS bytes, j.max_checkpoint_bytes AS max_bytes
FROM pgml.jobs j LEFT JOIN pgml.checkpoints c ON c.job_id = j.id
WHERE j.id = %(id)s
GROUP BY j.max_checkpoint_bytes;

-- name: prune_checkpoints
DELETE FROM pgml.checkpoints
WHERE job_id = %(id)s
  AND id NOT IN (SELECT id FROM pgml.checkpoints WHERE job_id = %(id)s ORDER BY step DESC LIMIT %(keep)s);

-- name: latest_checkpoint
SELECT id, step, attempt, bytes FROM pgml.checkpoints WHERE job_id = %(id)s ORDER BY step DESC LIMIT 1;

-- name: checkpoint_files
SELECT path, part, data FROM pgml.checkpoint_files WHERE checkpoint_id = %(checkpoint_id)s ORDER BY path, part;

-- name: claim_requests
-- The inference lane (the serving process; the functions of 0013_serving.sql).
SELECT * FROM pgml._requests_claim(%(serving_id)s, %(max_n)s, %(lease_seconds)s);

-- name: renew_requests
SELECT id FROM pgml._requests_renew(%(serving_id)s, %(lease_seconds)s) AS r (id);

-- name: finish_request
-- An answer (result, usage) or an error (error not NULL).
SELECT pgml._request_finish(%(id)s, %(serving_id)s, %(result)s::jsonb, %(usage)s::jsonb, %(error)s) AS owned;

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
-- The stored model a request's pgml:<ref> names for its submitter (0013: only models it may read).
SELECT id, status, base_model, task, project_name FROM pgml._serving_model(%(owner)s, %(ref)s) LIMIT 1;
