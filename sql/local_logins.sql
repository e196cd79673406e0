-- The logins of the embedded default (trust authentication on a Unix socket in the data directory only):
-- a user who submits, a worker that serves, its training children's and its serving process's own logins, as in any deployment
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
DO $$
BEGIN
    CREATE ROLE pgml_local_serving LOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END $$;
GRANT pgml_user TO pgml_local_user;
GRANT pgml_worker TO pgml_local_worker;
GRANT pgml_child TO pgml_local_child;  -- only the ticketed pgml._child_* functions
GRANT pgml_serving TO pgml_local_serving;  -- only the inference lane's functions
GRANT CREATE ON SCHEMA public TO pgml_local_user;  -- the user's own tables (the demo's reviews)
