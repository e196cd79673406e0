-- 0035_serving_role: the serving process (the inference lane, worker/serving.py) gets a role of its own. Plain SQL,
-- idempotent, runnable with psql by an administrator.
--
-- It used to connect as the worker's login, which reads every user's jobs, logs and models: a model's code or a
-- flaw in a tokenizer running in it could read all of that. pgml_serving may execute only the functions of the
-- inference lane (sql/functions/90_grants.sql: claim, renew, answer, finish, stream chunks, release, expire; the
-- stored model a request's submitter may read, its files; the hub allow-list's verdict) and read no table.
--   pgml_serving (NOLOGIN; granted to the serving process's login: CREATE ROLE worker_serving LOGIN;
--                GRANT pgml_serving TO worker_serving; then PGML_SERVING_DSN on the worker)
-- pgml_worker is a member of pgml_serving: a worker without a serving login of its own starts its serving process
-- on its own login with the startup option `role=pgml_serving` (SET ROLE), as its children without a login of their
-- own use pgml_child's functions through the worker's login; the credentials are then still the worker's.

DO $$
BEGIN
    CREATE ROLE pgml_serving NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another database of this cluster (or a concurrent migration) created it
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0035_serving_role') ON CONFLICT DO NOTHING;
