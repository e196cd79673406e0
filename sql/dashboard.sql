-- The dashboard's statements (daemon/pgml_tuned/dashboard/): reads only, over the views and tables a user reads,
-- run on the viewer's own login in read-only sessions, so row-level security and the views' filters decide what
-- each viewer sees. Each answers one JSON value (intervals in seconds), sent to the page as it is.

-- name: jobs
-- The latest jobs, each with its kind (tune: it trains a model the page can show; load_dataset: a dataset into a
-- table; predict_batch: a model's predictions into a table) and the error of each failed attempt (oldest first).
SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.id DESC), '[]') AS jobs
FROM (SELECT s.id, s.project, s.task,
             CASE WHEN s.task IN ('load_dataset', 'predict_batch') THEN s.task ELSE 'tune' END AS kind,
             s.status, s.attempt, s.max_attempts, s.step, s.max_steps, s.progress_pct,
             s.last_loss, extract(epoch FROM s.eta)::float8 AS eta_seconds, s.heartbeat_age, s.cancel_requested,
             s.model_id, s.metrics, s.error, s.created_at, s.started_at, s.finished_at, s.submitted_by,
             (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_object(
                         'attempt', e.value -> 'attempt', 'at', e.value -> 'at', 'error', e.value ->> 'error')
                     ORDER BY e.n), '[]')
              FROM pgml.jobs j, pg_catalog.jsonb_array_elements(j.errors) WITH ORDINALITY AS e(value, n)
              WHERE j.id = s.id) AS errors
      FROM pgml.job_status s
      ORDER BY s.id DESC
      LIMIT %(limit)s) x

-- name: model
SELECT pg_catalog.json_build_object(
           'id', m.id, 'project', p.name, 'task', m.task, 'status', m.status, 'model_name', m.model_name,
           'base_model', m.base_model, 'relation_name', m.relation_name, 'hyperparams', m.hyperparams,
           'metrics', m.metrics, 'created_at', m.created_at, 'updated_at', m.updated_at,
           'job_id', (SELECT max(j.id) FROM pgml.jobs j WHERE j.model_id = m.id),
           'files', (SELECT coalesce(pg_catalog.json_agg(f ORDER BY f.path), '[]')
                     FROM (SELECT fp.path, count(*) AS parts, sum(pg_catalog.octet_length(fp.data))::bigint AS bytes
                           FROM pgml.files fp
                           WHERE fp.model_id = m.id
                           GROUP BY fp.path) f)) AS model
FROM pgml.models m
JOIN pgml.projects p ON p.id = m.project_id
WHERE m.id = %(model_id)s

-- name: model_logs
SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.id), '[]') AS logs
FROM (SELECT l.id, l.job_id, l.attempt, l.created_at, l.logs
      FROM pgml.logs l
      WHERE l.model_id = %(model_id)s AND l.id > %(after)s
      ORDER BY l.id
      LIMIT %(limit)s) x
