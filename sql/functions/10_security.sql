-- Ownership and the schema guard: who owns what pgml-tuned creates, and the event trigger that keeps users' DDL out
-- of pgml-tuned's objects.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- ---- ownership and privileges ---------------------------------------------------------------------------
-- Every object of schema pgml belongs to pgml_owner (called by every migrate, first thing in 90_grants.sql).
CREATE OR REPLACE FUNCTION pgml._own_everything() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    EXECUTE 'ALTER SCHEMA pgml OWNER TO pgml_owner';
    -- what the migrating role created; users' own tables and views in pgml stay theirs
    FOR r IN SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'pgml' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
               AND c.relowner = current_user::regrole LOOP
        EXECUTE format('ALTER %s pgml.%I OWNER TO pgml_owner',
                       CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, r.relname);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS sig, p.prokind FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgml' AND p.proowner = current_user::regrole LOOP
        EXECUTE format('ALTER %s %s OWNER TO pgml_owner', CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END,
                       r.sig);
    END LOOP;
END $$;

-- ---- users' tables and views in schema pgml ----------------------------------------------------------------
-- The guide creates its views in schema pgml (CREATE VIEW pgml.imdb_train_view ...). Anyone who may create
-- objects in a schema may also create functions there, and a user's pgml.cancel(integer) would run as whoever
-- calls pgml.cancel(5): so users get CREATE on schema pgml only together with an event trigger that refuses
-- every object but tables, views, indexes and sequences from anyone who is not pgml_owner. Event triggers need
-- a superuser; a migration run by a non-superuser leaves CREATE on pgml to pgml_owner alone (say so).
CREATE OR REPLACE FUNCTION pgml._guard_schema() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    obj record;
BEGIN
    IF pg_has_role(current_user, 'pgml_owner', 'MEMBER') THEN
        RETURN;
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF obj.schema_name = 'pgml' AND obj.object_type NOT IN
           ('table', 'view', 'materialized view', 'index', 'sequence', 'table column', 'table constraint',
            'trigger', 'rule', 'policy', 'statistics object') THEN
            RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
                MESSAGE = format('%s may not create a %s in schema pgml (%s)', current_user, obj.object_type,
                                 obj.object_identity),
                HINT = 'schema pgml takes your tables and views; create functions and types in a schema of your own';
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgml._require_admin(what text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER') THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('%s is for administrators; %I is not a member of pgml_admin', what,
                                        session_user),
            HINT = 'ask a member of pgml_admin to run it';
    END IF;
END $$;

-- The guard runs on every DDL command of the database (an event trigger, which only a superuser may create). With
-- it in place users may create their own objects in schema pgml (the guide creates its views there); without it
-- (migrated by a non-superuser) they get no CREATE on pgml.
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgml_guard_schema') THEN
            CREATE EVENT TRIGGER pgml_guard_schema ON ddl_command_end EXECUTE FUNCTION pgml._guard_schema();
        END IF;
        GRANT CREATE ON SCHEMA pgml TO pgml_user;
    ELSIF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgml_guard_schema') THEN
        RAISE NOTICE 'not a superuser: no event trigger guards schema pgml, so pgml_user gets no CREATE on it '
                     '(create the guide''s views in a schema of your own, or migrate once as a superuser)';
    END IF;
END $$;
