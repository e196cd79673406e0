-- 0012_load_dataset: the job behind pgml.load_dataset (PostgresML's name, table shape and result).
--
--   SELECT pgml.load_dataset_async('imdb');          -- returns the job id at once; CALL pgml.wait(id) follows it
--   SELECT * FROM pgml._dataset_result(id);          -- (table_name, rows) once it succeeded; no row while it runs
--
-- A worker's child loads the dataset with the `datasets` library (recipes/load_dataset.py) and COPYs it into a
-- staging table that pgml._dataset_begin() creates for that attempt (owned by pgml_owner; the worker login gets
-- INSERT on it and nothing else). pgml._dataset_commit(), in the child's final fenced transaction together with
-- the job's success, swaps it in under the dataset's name (pgml.imdb, pgml."FinGPT/fingpt-sentiment-train"):
-- readers see the old table or the new one, never half of one, and a reload leaves exactly one copy. A job that
-- fails, is cancelled or requeued drops its staging table (trigger below). The table belongs to pgml_owner and
-- its loader may SELECT it (the guide creates its own views over it); pgml.datasets records who loaded what.
-- Plain SQL, idempotent, runnable with psql by an administrator.

INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams, admin_only)
VALUES ('load_dataset', '{}', '{}', '{}', '{source,subset,limit,kwargs}', false)
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams, admin_only = EXCLUDED.admin_only;

-- Every table pgml.load_dataset created: a name here is a table pgml.<name> that a load may replace.
CREATE TABLE IF NOT EXISTS pgml.datasets (
    name      text PRIMARY KEY,        -- the table is pgml.<name> (the source as given)
    source    text NOT NULL,
    subset    text,
    loaded_by name NOT NULL,           -- the session login that called pgml.load_dataset
    job_id    bigint,
    rows      bigint NOT NULL,
    columns   jsonb NOT NULL,          -- [{"name": ..., "type": ...}, ...] in table order
    loaded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE pgml.datasets ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS user_read ON pgml.datasets;
CREATE POLICY user_read ON pgml.datasets FOR SELECT TO pgml_user
    USING (loaded_by = session_user OR pg_has_role(session_user, 'pgml_admin', 'MEMBER'));

INSERT INTO pgml.schema_migrations (version) VALUES ('0012_load_dataset') ON CONFLICT DO NOTHING;
