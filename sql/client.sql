-- The statements of the Python client (daemon/pgml_tuned/client.py: OpenSourceAI), as named blocks
-- (`-- name: x`) loaded with pgml_tuned.db.q(name, file="client.sql"). They run on the user's own login, in
-- autocommit: a request is committed at once, so the serving lane sees it.

-- name: listen_answers
-- Wake this connection when a request is answered (the serving lane notifies pgml_answers, naming no request:
-- any answer wakes it, and the caller looks at its own request again).
LISTEN pgml_answers;

-- name: request
-- Queue a request for the serving lane (kind: chat, classify, generate, embed or rank); answers its id.
SELECT pgml.request(%(kind)s, %(model)s, %(args)s, %(inputs)s) AS id;

-- name: request_answer
-- Take a request's answer (deleted as it is taken): its status, and result, usage or error once done.
SELECT * FROM pgml._request_answer(%(id)s);

-- name: request_abandon
-- Give up on a request the caller no longer waits for (a timeout, an interrupt, a closed stream).
SELECT pgml._request_abandon(%(id)s);

-- name: request_chunks
-- The pieces of a streamed answer written after piece number `after`, in order.
SELECT seq, text FROM pgml._request_chunks(%(id)s, %(after)s);

-- name: tune
-- Queue a fine-tune. The Python fills the braces with the named arguments that follow the project's name
-- (each a comma, the name quoted with psycopg.sql.Identifier, => and its placeholder).
SELECT * FROM pgml.tune(%(project_name)s{});

-- name: listen_job_status
-- Wake this connection when a job changes state (every change of a job's status notifies pgml_job_status, naming
-- no job: any job's change wakes it, and the caller reads its job's row again).
LISTEN pgml_job_status;

-- name: job_end
-- wait(): a job's status, and its error, metrics and model once it ends.
SELECT id, status, error, metrics, model_id FROM pgml.jobs WHERE id = %(job_id)s;

-- name: job_logs
-- logs(): every log row of a job, in order.
SELECT l.created_at, l.logs FROM pgml.logs l WHERE l.job_id = %(job_id)s ORDER BY l.id;

-- name: cancel_job
-- cancel(): cancel a queued or running job (pgml.cancel); answers what became of it.
SELECT pgml.cancel(%(job_id)s) AS s;
