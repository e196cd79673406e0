-- The logins of the embedded default (trust authentication on a Unix socket in the data directory only):
-- a user who submits, a worker that serves and its training children's own login, as in any deployment
-- (README: Against your own PostgreSQL).
-- Run by `pgml-tuned` after migrating the embedded server; plain SQL, idempotent.
DO $$
BEGIN
    CREATE ROLE pgml_local_user LOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE pgml_local_worker LOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE pgml_local_child LOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;
GRANT pgml_user TO pgml_local_user;
GRANT pgml_worker TO pgml_local_worker;
GRANT pgml_child TO pgml_local_child;  -- only the ticketed pgml._child_* functions
GRANT CREATE ON SCHEMA public TO pgml_local_user;  -- the user's own tables (the demo's reviews)
