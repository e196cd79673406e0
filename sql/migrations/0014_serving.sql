-- 0014_serving: the inference lane's requests and answers. A request is a row a trusted submitter (the
-- pgml.transform loopback, the Python client's API) inserts through pgml._request_submit; a serving process
-- (the daemon's child `python -m pgml_tuned.serving`, as pgml_worker) claims batches of them, answers each
-- (result, or error; streamed generation writes chunks as it goes), and the submitter consumes the answer
-- with pgml._request_answer, which deletes it. Nothing piles up: consumed answers are deleted at once, answers
-- nobody consumed after a short TTL, requests nobody picked up at their deadline; a request whose serving
-- process died is retried once, then failed (its lease runs out within seconds, or the daemon that saw the
-- process die releases it at once).
--
-- Status: queued → running → done | failed   (running → queued once, when its serving process died)

CREATE TABLE IF NOT EXISTS pgml.requests (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    submitted_by     name NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('classify', 'generate', 'chat')),
    model            text NOT NULL,        -- as the worker resolves it: a hub id, a directory, pgml:<ref>
    args             jsonb NOT NULL DEFAULT '{}',
    inputs           jsonb NOT NULL,
    stream           boolean NOT NULL DEFAULT false,
    status           text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    claimed_by       text,                 -- the serving process (worker id/serving-N)
    lease_expires_at timestamptz,          -- running: renewed by its serving process while it works
    deadline         timestamptz NOT NULL, -- queued past it: nobody serves; deleted
    attempts         integer NOT NULL DEFAULT 0,
    result           jsonb,
    error            text,
    usage            jsonb,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    answered_at      timestamptz
);
CREATE INDEX IF NOT EXISTS requests_queued_idx ON pgml.requests (id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS requests_running_idx ON pgml.requests (claimed_by) WHERE status = 'running';

-- Streamed generation: text pieces in order, readable while the request runs; deleted with their request.
CREATE TABLE IF NOT EXISTS pgml.request_chunks (
    request_id bigint NOT NULL REFERENCES pgml.requests (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    text       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (request_id, seq)
);

-- What a project serves: pgml.deployments (0013_loopback), its latest row, else its latest successful model.

ALTER TABLE pgml.requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.request_chunks ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS worker_all ON pgml.deployments;
CREATE POLICY worker_all ON pgml.deployments FOR SELECT TO pgml_worker USING (true);

INSERT INTO pgml.schema_migrations (version) VALUES ('0014_serving') ON CONFLICT DO NOTHING;
