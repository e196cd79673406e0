-- The loopback: an autonomous connection (dblink) through which synchronous calls submit and see the answer, and
-- how a statement that arrives through it proves who sent it.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- Where dblink lives (NULL: not installed) and whether the loopback may skip dblink's password check.
CREATE OR REPLACE FUNCTION pgml._dblink_schema() RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'dblink'
$$;

-- (Re)creates this database's loopback login. Run by the migration; an administrator runs it again after
-- moving the server (SELECT pgml._setup_loopback('host=... port=...')).
CREATE OR REPLACE FUNCTION pgml._setup_loopback(p_conninfo text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema   name := pgml._dblink_schema();
    v_login    name := 'pgml_loopback_' || (SELECT d.oid FROM pg_catalog.pg_database d
                                            WHERE d.datname = pg_catalog.current_database());
    v_password text := pg_catalog.replace(pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text,
                                          '-', '');
    v_secret   text := pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
                           pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, 'UTF8')), 'hex');
    v_socket   text;
    v_conninfo text;
BEGIN
    BEGIN  -- reading it needs pg_read_all_settings (managed servers: loop back over TCP to localhost)
        v_socket := pg_catalog.split_part(pg_catalog.current_setting('unix_socket_directories'), ',', 1);
    EXCEPTION WHEN insufficient_privilege THEN
        v_socket := NULL;
    END;
    v_conninfo := coalesce(p_conninfo, format('host=%s port=%s',
        CASE WHEN pg_catalog.btrim(coalesce(v_socket, '')) <> '' THEN pg_catalog.btrim(v_socket) ELSE 'localhost' END,
        pg_catalog.current_setting('port')));
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_login) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', v_login);
    END IF;
    EXECUTE format('GRANT pgml_loopback TO %I', v_login);  -- what the loopback may call is granted to the group
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L CONNECTION LIMIT -1', v_login, v_password);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', pg_catalog.current_database(), v_login);
    EXECUTE format('GRANT USAGE ON SCHEMA pgml TO %I', v_login);
    INSERT INTO pgml.loopback_login (login, password, secret, conninfo) VALUES (v_login, v_password, v_secret, v_conninfo)
    ON CONFLICT (id) DO UPDATE SET login = EXCLUDED.login, password = EXCLUDED.password, secret = EXCLUDED.secret,
                                   conninfo = EXCLUDED.conninfo, created_at = pg_catalog.clock_timestamp();
    IF v_schema IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pgml_owner', v_schema);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.dblink(text, text), %1$I.dblink_connect(text, text), '
                       '%1$I.dblink_disconnect(text), %1$I.dblink_get_connections() TO pgml_owner', v_schema);
        IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
            -- trust servers: the loopback need not send a password, which dblink_connect refuses to non-superusers
            EXECUTE format('GRANT EXECUTE ON FUNCTION %I.dblink_connect_u(text, text) TO pgml_owner', v_schema);
        END IF;
    END IF;
    RETURN v_login;
END $$;

-- Who is calling: session_user, or for a statement that arrived through the loopback, the user whose session
-- sent it (proved by pgml._loopback_proof; anything else through the loopback is refused).
CREATE OR REPLACE FUNCTION pgml._submitter() RETURNS name
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_lb    pgml.loopback_login;
    v_user  text := pg_catalog.current_setting('pgml.on_behalf_of', true);
    v_proof text := pg_catalog.current_setting('pgml.loopback_proof', true);
BEGIN
    SELECT * INTO v_lb FROM pgml.loopback_login;
    IF v_lb.login IS NULL OR session_user <> v_lb.login THEN
        RETURN session_user;
    END IF;
    IF coalesce(v_user, '') = '' OR coalesce(v_proof, '') = ''
       OR pg_catalog.split_part(v_proof, ':', 2) <> pgml._loopback_proof(v_lb.secret, v_user, pg_catalog.pg_backend_pid(),
                                                                          pg_catalog.split_part(v_proof, ':', 1)) THEN
        RAISE EXCEPTION 'a loopback statement without a valid proof' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN v_user::name;
END $$;

CREATE OR REPLACE FUNCTION pgml._loopback_proof(secret text, who text, pid integer, nonce text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
        secret || ':' || who || ':' || pid::text || ':' || nonce, 'UTF8')), 'hex')
$$;

-- Runs `stmt` (an expression whose value is jsonb) through this session's loopback, as the calling user, and
-- returns its value. The connection stays open for the session (0.2–0.6 ms a statement instead of 2–3 ms a
-- connect); one that broke (server restart, idle timeout) is opened again once.
CREATE OR REPLACE FUNCTION pgml._loopback(stmt text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema name := pgml._dblink_schema();
    v_lb     pgml.loopback_login;
    v_pid    integer;
    v_result text;
    v_try    integer := 0;
BEGIN
    IF v_schema IS NULL THEN
        RAISE EXCEPTION 'this call needs the dblink extension, which is not installed in database %',
            pg_catalog.current_database()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'an administrator runs CREATE EXTENSION dblink (a contrib module every major managed '
                         'PostgreSQL offers), then pgml-tuned migrate; or use the asynchronous form: '
                         'SELECT pgml.load_dataset_async(...) and CALL pgml.wait(job_id)';
    END IF;
    SELECT * INTO v_lb FROM pgml.loopback_login;
    LOOP
        v_try := v_try + 1;
        v_pid := pgml._loopback_ready(v_schema, v_lb);
        BEGIN
            EXECUTE format('SELECT t.v FROM %I.dblink(%L, %L) AS t(v text)', v_schema, 'pgml_loopback',
                           pgml._loopback_statement(v_lb, v_pid, stmt))
                INTO v_result;
            RETURN v_result::jsonb;
        EXCEPTION WHEN connection_exception OR sqlclient_unable_to_establish_sqlconnection OR admin_shutdown
                       OR crash_shutdown OR insufficient_privilege THEN
            -- a broken connection, or one that is not ours (opened by someone else under this name)
            IF v_try > 1 THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.set_config('pgml.loopback_pid', '', false);
            BEGIN
                EXECUTE format('SELECT %I.dblink_disconnect(%L)', v_schema, 'pgml_loopback');
            EXCEPTION WHEN OTHERS THEN
                NULL;
            END;
        WHEN internal_error THEN
            -- dblink's "could not send query: another command is already in progress" (its words depend on
            -- lc_messages): the result of a pgml._loopback_send that pgml._loopback_ready did not know of (its mark
            -- went with a rolled-back transaction); read it, try once more (any other such error comes back then)
            IF v_try > 1 THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.set_config('pgml.loopback_pending', 'on', false);
        END;
    END LOOP;
END $$;

-- Sends `stmt` (as pgml._loopback takes it) through this session's loopback and returns at once,
-- without its result: for a write whose outcome the caller does not need (an answer's removal: a request nobody
-- removes is deleted 60 s after its answer by pgml._requests_expire). The result is read (and dropped) before the
-- connection's next statement, by pgml._loopback_ready. A one-text pgml.embed returns without waiting for it.
CREATE OR REPLACE FUNCTION pgml._loopback_send(stmt text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_schema name := pgml._dblink_schema();
    v_lb     pgml.loopback_login;
    v_pid    integer;
BEGIN
    IF v_schema IS NULL THEN
        RETURN;  -- no loopback: nothing was submitted through one either
    END IF;
    SELECT * INTO v_lb FROM pgml.loopback_login;
    BEGIN
        v_pid := pgml._loopback_ready(v_schema, v_lb);
        EXECUTE format('SELECT %I.dblink_send_query(%L, %L)', v_schema, 'pgml_loopback',
                       pgml._loopback_statement(v_lb, v_pid, stmt));
        PERFORM pg_catalog.set_config('pgml.loopback_pending', 'on', false);
    EXCEPTION WHEN connection_exception OR sqlclient_unable_to_establish_sqlconnection OR admin_shutdown
                   OR crash_shutdown OR insufficient_privilege OR internal_error THEN
        NULL;  -- not sent: what it would have done is done later (see above); the next call connects again
    END;
END $$;

-- This session's loopback connection, open and free for a statement: its backend's pid. A result that
-- pgml._loopback_send left (the mark pgml.loopback_pending) is read first, waiting for it if it is still running,
-- and dropped, its error too (dblink wants every result read before the next statement).
CREATE OR REPLACE FUNCTION pgml._loopback_ready(v_schema name, v_lb pgml.loopback_login) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_pid integer := nullif(pg_catalog.current_setting('pgml.loopback_pid', true), '')::integer;
BEGIN
    IF v_pid IS NULL OR NOT EXISTS (
            SELECT 1 FROM pg_catalog.unnest(pgml._dblink_connections(v_schema)) c WHERE c = 'pgml_loopback') THEN
        PERFORM pg_catalog.set_config('pgml.loopback_pending', '', false);
        RETURN pgml._loopback_connect(v_schema, v_lb);
    END IF;
    IF pg_catalog.current_setting('pgml.loopback_pending', true) = 'on' THEN
        PERFORM pg_catalog.set_config('pgml.loopback_pending', '', false);
        BEGIN  -- its rows, or its error: not the caller's (what it did not do is done later)
            EXECUTE format('SELECT pg_catalog.count(*) FROM %I.dblink_get_result(%L) AS t(v text)', v_schema,
                           'pgml_loopback');
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
        BEGIN  -- the end of its results
            EXECUTE format('SELECT pg_catalog.count(*) FROM %I.dblink_get_result(%L) AS t(v text)', v_schema,
                           'pgml_loopback');
        EXCEPTION WHEN OTHERS THEN  -- a connection in a state of its own: a new one
            RETURN pgml._loopback_connect(v_schema, v_lb);
        END;
    END IF;
    RETURN v_pid;
END $$;

-- `stmt` as the loopback runs it: one statement, the proof that this session sent it set (in the subquery,
-- evaluated first) for the expression that follows, whose value comes back as text.
CREATE OR REPLACE FUNCTION pgml._loopback_statement(v_lb pgml.loopback_login, v_pid integer, stmt text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_nonce text := pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '');
BEGIN
    RETURN format('SELECT (%3$s)::text FROM (SELECT pg_catalog.set_config(''pgml.on_behalf_of'', %1$L, true), '
                  'pg_catalog.set_config(''pgml.loopback_proof'', %2$L, true) OFFSET 0) AS proof',
                  session_user, v_nonce || ':' || pgml._loopback_proof(v_lb.secret, session_user, v_pid, v_nonce),
                  stmt);
END $$;

CREATE OR REPLACE FUNCTION pgml._dblink_connections(v_schema name) RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text[];
BEGIN
    EXECUTE format('SELECT %I.dblink_get_connections()', v_schema) INTO v;
    RETURN coalesce(v, '{}');
END $$;

CREATE OR REPLACE FUNCTION pgml._loopback_connect(v_schema name, v_lb pgml.loopback_login) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_connstr text := format('%s dbname=%s user=%s password=%s application_name=pgml_loopback',
                             v_lb.conninfo, pgml._conn_quote(pg_catalog.current_database()),
                             pgml._conn_quote(v_lb.login), pgml._conn_quote(v_lb.password));
    v_pid    integer;
    v_detail text;
BEGIN
    IF pgml._dblink_connections(v_schema) @> ARRAY['pgml_loopback'] THEN
        EXECUTE format('SELECT %I.dblink_disconnect(%L)', v_schema, 'pgml_loopback');
    END IF;
    BEGIN
        IF pg_catalog.has_function_privilege(format('%I.dblink_connect_u(text, text)', v_schema), 'EXECUTE') THEN
            EXECUTE format('SELECT %I.dblink_connect_u(%L, %L)', v_schema, 'pgml_loopback', v_connstr);
        ELSE
            EXECUTE format('SELECT %I.dblink_connect(%L, %L)', v_schema, 'pgml_loopback', v_connstr);
        END IF;
    EXCEPTION
        WHEN prohibited_sql_statement_attempted THEN
            -- dblink's "password is required": the server let the login in without asking for its password (trust,
            -- peer), which dblink_connect refuses to a session that is not a superuser's
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'invalid_authorization_specification',
                MESSAGE = format('the loopback of database %s cannot log in: this server lets its login %s in '
                                 'without asking for a password (pg_hba.conf: trust or peer), and dblink refuses '
                                 'that to a session that is not a superuser''s',
                                 pg_catalog.current_database(), v_lb.login),
                DETAIL = format('dblink: %s (%s)', SQLERRM, v_detail),
                HINT = pgml._loopback_password_fix(v_lb);
        WHEN sqlclient_unable_to_establish_sqlconnection THEN
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            RAISE EXCEPTION USING ERRCODE = 'sqlclient_unable_to_establish_sqlconnection',
                MESSAGE = format('the loopback of database %s cannot connect to %s', pg_catalog.current_database(),
                                 v_lb.conninfo),
                DETAIL = format('dblink: %s (%s)', SQLERRM, pg_catalog.btrim(v_detail, E' \n')),
                HINT = 'an administrator says where this server reaches itself (a socket directory or an address '
                       'it listens on): SELECT pgml._setup_loopback(''host=... port=...'')';
    END;
    EXECUTE format('SELECT t.p FROM %I.dblink(%L, %L) AS t(p integer)', v_schema, 'pgml_loopback',
                   'SELECT pg_catalog.pg_backend_pid()') INTO v_pid;
    PERFORM pg_catalog.set_config('pgml.loopback_pid', v_pid::text, false);
    RETURN v_pid;
END $$;

-- The fix for a server that lets the loopback in without a password: the pg_hba.conf line that asks it for one (a
-- socket's `local`, or `host ... samehost` for an address of this server), or the loopback pointed at connections
-- that ask for one already.
CREATE OR REPLACE FUNCTION pgml._loopback_password_fix(v_lb pgml.loopback_login) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.format(
        'an administrator adds this line to pg_hba.conf above the lines that let it in now (the first line that '
        'matches decides): %s — then runs SELECT pg_reload_conf(). Or, where connections over TCP ask for a '
        'password already: SELECT pgml._setup_loopback(''host=127.0.0.1 port=%s'')',
        pg_catalog.concat_ws(' ',
            CASE WHEN h.host IS NULL OR h.host LIKE '/%' OR h.host LIKE '@%' THEN 'local' ELSE 'host' END,
            CASE WHEN pg_catalog.current_database() ~ '^[a-z_][a-z0-9_]*$' THEN pg_catalog.current_database()::text
                 ELSE '"' || pg_catalog.current_database() || '"' END,
            v_lb.login,
            CASE WHEN h.host IS NULL OR h.host LIKE '/%' OR h.host LIKE '@%' THEN NULL ELSE 'samehost' END,
            'scram-sha-256'),
        pg_catalog.current_setting('port'))
    FROM (SELECT pg_catalog.substring(v_lb.conninfo, '(?:^|\s)host\s*=\s*''?([^''\s]+)') AS host) h
$$;

-- Loopback logins whose database is gone (a database migrated, then dropped, leaves its login in the cluster):
-- named pgml_loopback_<oid> exactly, a member of pgml_loopback, no database with that oid, owning nothing and
-- granted nothing (pg_shdepend: a copy of a database keeps its template's login, and the rights given to it).
-- apply: drop them, as the calling role (SECURITY INVOKER: CREATEROLE, or a superuser); one row per login.
CREATE OR REPLACE FUNCTION pgml._stale_loopback_logins(apply boolean DEFAULT false)
RETURNS TABLE (login name, dropped boolean, note text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_may boolean := (SELECT r.rolsuper OR r.rolcreaterole FROM pg_catalog.pg_roles r WHERE r.rolname = current_user);
BEGIN
    FOR login IN
        SELECT r.rolname FROM pg_catalog.pg_roles r
        WHERE r.rolname ~ '^pgml_loopback_[0-9]{1,10}$'
          AND r.rolcanlogin AND NOT r.rolsuper
          AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                      WHERE m.member = r.oid AND g.rolname = 'pgml_loopback')
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d
                          WHERE d.oid::text = pg_catalog.substr(r.rolname, pg_catalog.length('pgml_loopback_') + 1))
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend s
                          WHERE s.refclassid = 'pg_catalog.pg_authid'::regclass AND s.refobjid = r.oid)
        ORDER BY r.rolname
    LOOP
        dropped := false;
        IF NOT v_may THEN
            note := format('its database is gone; not dropped: %s may not drop roles (an administrator with '
                           'CREATEROLE runs pgml-tuned gc --apply, or DROP ROLE %I)', current_user, login);
        ELSIF NOT apply THEN
            note := 'its database is gone (--apply drops it)';
        ELSE
            BEGIN
                EXECUTE format('DROP ROLE %I', login);
                dropped := true;
                note := 'its database is gone: dropped';
            EXCEPTION WHEN insufficient_privilege OR dependent_objects_still_exist OR undefined_object THEN
                note := format('its database is gone; not dropped: %s', SQLERRM);
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgml._conn_quote(v text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '''' || pg_catalog.replace(pg_catalog.replace(v, '\', '\\'), '''', '\''') || ''''
$$;

-- A new database gets its loopback login on its first migrate; an administrator runs pgml._setup_loopback() again
-- after moving the server (a migrate never rotates the login's password behind the sessions that use it).
SELECT pgml._setup_loopback() WHERE NOT EXISTS (SELECT 1 FROM pgml.loopback_login);
