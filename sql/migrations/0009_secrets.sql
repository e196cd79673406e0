-- 0009_secrets: how a job gets its Hugging Face token, done properly. Plain SQL, idempotent, runnable with psql
-- by an administrator.
--
-- (a) Named credentials (the recommended way). Workers hold a directory of credentials, one file per name with
--     the token in it (systemd LoadCredential=, or $PGML_HOME/credentials). Administrators say which roles may
--     use which name: pgml.allow_credential(name, role), pgml.revoke_credential(name, role),
--     pgml.drop_credential(name). A user writes "hub_credential": "<name>" in hyperparams; pgml.tune() checks
--     that the caller may use it and records the name on the job (never a token). At the start of every attempt
--     the worker asks pgml.job_credential(job, attempt) whether the submitter still may, then reads the file.
-- (b) Inline tokens ("token" / "hub_token" / "training_args.hub_token", as in the guide) are sealed at submit,
--     in PL/pgSQL, with RSA-OAEP (SHA-256, MGF1-SHA-256; RFC 8017 7.1.1) to the one active key of the keyring
--     pgml.sealing_keys that an administrator registered (`pgml-tuned keys register`; a worker never creates
--     or registers a key). Sealed format:
--         'v2:' || key_id || ':' || base64(C_1) || '.' || base64(C_2) ...
--     The compact JSON text of the secrets (UTF-8) is cut into blocks of at most k - 66 bytes (k = modulus
--     bytes: 318 bytes a block for RSA-3072); block i of n is encrypted with the OAEP label
--         'pgml-tuned:v2:' || job_id || ':' || submitter || ':' || i || '/' || n
--     so a ciphertext opens only for the job and the submitter it was sealed for (copied to another job it is
--     garbage), and blocks cannot be reordered or dropped. The workers decrypt with the `cryptography` library;
--     every failure is one identical error. A job's secrets are deleted when it ends (pgml._job_changed).
--     `rsa1:` blobs of 0002 (PKCS#1 v1.5, unbound) are never decrypted again: such a queued job fails with that
--     same error and must be resubmitted.
--
-- Nothing here RAISEs, NOTICEs or logs a plaintext; errors name no secret value.

-- ---- the old protocol goes: a table the workers could write, the "newest row" sealing key ----------------
DROP FUNCTION IF EXISTS pgml._seal(jsonb);
DROP FUNCTION IF EXISTS pgml._random_nonzero_bytes(integer);
DROP TABLE IF EXISTS pgml.worker_keys;

-- `count` uniformly random bytes from gen_random_uuid() (core since PostgreSQL 13, backed by pg_strong_random).
-- Of the 16 bytes of a v4 UUID, bytes 6 (version nibble) and 8 (variant bits) are not fully random: skipped.
CREATE OR REPLACE FUNCTION pgml._random_bytes(count integer) RETURNS bytea
LANGUAGE plpgsql VOLATILE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    out bytea := '';
    u   bytea;
BEGIN
    WHILE length(out) < count LOOP
        u := pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
        out := out || substring(u FROM 1 FOR 6) || substring(u FROM 8 FOR 1) || substring(u FROM 10 FOR 7);
    END LOOP;
    RETURN substring(out FROM 1 FOR count);
END $$;

-- a XOR b (equal lengths)
CREATE OR REPLACE FUNCTION pgml._xor(a bytea, b bytea) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r bytea := a;
BEGIN
    IF length(a) <> length(b) THEN
        RAISE EXCEPTION 'pgml._xor: lengths differ (% and %)', length(a), length(b)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0 .. length(a) - 1 LOOP
        r := pg_catalog.set_byte(r, i, pg_catalog.get_byte(a, i) # pg_catalog.get_byte(b, i));
    END LOOP;
    RETURN r;
END $$;

-- MGF1 with SHA-256 (RFC 8017 B.2.1): `len` bytes of mask from `seed`.
CREATE OR REPLACE FUNCTION pgml._mgf1_sha256(seed bytea, len integer) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t       bytea := '';
    counter integer := 0;
BEGIN
    WHILE length(t) < len LOOP
        t := t || pg_catalog.sha256(seed || pg_catalog.int4send(counter));
        counter := counter + 1;
    END LOOP;
    RETURN substring(t FROM 1 FOR len);
END $$;

-- RSAES-OAEP-ENCRYPT (RFC 8017 7.1.1) with SHA-256 and MGF1-SHA-256: one block, k bytes.
CREATE OR REPLACE FUNCTION pgml._oaep_encrypt(n numeric, e numeric, message bytea, label bytea) RETURNS bytea
LANGUAGE plpgsql VOLATILE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k      integer := length(pgml._numeric_to_bytea(n));
    h_len  CONSTANT integer := 32;
    db     bytea;
    seed   bytea := pgml._random_bytes(32);
    masked bytea;
BEGIN
    IF length(message) > k - 2 * h_len - 2 THEN
        RAISE EXCEPTION 'pgml._oaep_encrypt: message too long for the key'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    db := pg_catalog.sha256(label) || pg_catalog.decode(pg_catalog.repeat('00', k - length(message) - 2 * h_len - 2), 'hex')
          || '\x01'::bytea || message;
    masked := pgml._xor(db, pgml._mgf1_sha256(seed, k - h_len - 1));
    RETURN pgml._numeric_to_bytea(
        pgml._modpow(pgml._bytea_to_numeric('\x00'::bytea || pgml._xor(seed, pgml._mgf1_sha256(masked, h_len))
                                            || masked), e, n),
        k);
END $$;

-- ---- the keyring: public keys an administrator registered; one of them active (it seals) -----------------
CREATE TABLE IF NOT EXISTS pgml.sealing_keys (
    key_id      text PRIMARY KEY,       -- pgml._key_fingerprint(n): named in every blob sealed with it
    n           numeric NOT NULL CHECK (n > 0 AND scale(n) = 0),
    e           numeric NOT NULL CHECK (e >= 3 AND scale(e) = 0 AND mod(e, 2) = 1),
    active      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by  name NOT NULL DEFAULT session_user,
    retired_at  timestamptz,
    CONSTRAINT sealing_keys_id_matches CHECK (key_id = pgml._key_fingerprint(n)),
    CONSTRAINT sealing_keys_retired_inactive CHECK (retired_at IS NULL OR NOT active)
);
CREATE UNIQUE INDEX IF NOT EXISTS sealing_keys_one_active ON pgml.sealing_keys (active) WHERE active;

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

-- Registers the public half (n, e) of a key (`pgml-tuned keys register FILE` calls it); with activate (the
-- default) it becomes the sealing key at once. Returns its key id. Registering it again changes nothing.
CREATE OR REPLACE FUNCTION pgml.register_sealing_key(n numeric, e numeric, activate boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id text;
BEGIN
    PERFORM pgml._require_admin('registering a sealing key');
    IF n IS NULL OR e IS NULL OR n <= 0 OR length(pgml._numeric_to_bytea(trunc(n))) < 256 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'a sealing key needs an RSA modulus of at least 2048 bits',
            HINT = 'generate one with `pgml-tuned keys generate --out FILE` (RSA-3072)';
    END IF;
    v_id := pgml._key_fingerprint(n);
    INSERT INTO pgml.sealing_keys (key_id, n, e) VALUES (v_id, n, e) ON CONFLICT (key_id) DO NOTHING;
    IF activate THEN
        PERFORM pgml.activate_sealing_key(v_id);
    END IF;
    RETURN v_id;
END $$;

-- Makes a registered key the one that seals (the one active before stays registered: workers that hold it
-- still open the jobs sealed with it).
CREATE OR REPLACE FUNCTION pgml.activate_sealing_key(key_id text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._require_admin('activating a sealing key');
    PERFORM 1 FROM pgml.sealing_keys k WHERE k.key_id = activate_sealing_key.key_id AND k.retired_at IS NULL
        FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('no usable sealing key %L (unknown or retired)', activate_sealing_key.key_id),
            HINT = 'SELECT key_id, active, retired_at FROM pgml.sealing_keys lists them; register a new one with '
                   '`pgml-tuned keys register FILE`';
    END IF;
    UPDATE pgml.sealing_keys k SET active = false WHERE k.active AND k.key_id <> activate_sealing_key.key_id;
    UPDATE pgml.sealing_keys k SET active = true WHERE k.key_id = activate_sealing_key.key_id;
END $$;

-- Retires a key: it never seals again (and cannot be activated again). Jobs already sealed with it still run
-- on workers that hold it; the view pgml.sealing_key_use says how many wait, so its file can go when none do.
CREATE OR REPLACE FUNCTION pgml.retire_sealing_key(key_id text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._require_admin('retiring a sealing key');
    UPDATE pgml.sealing_keys k SET active = false, retired_at = coalesce(k.retired_at, pg_catalog.clock_timestamp())
    WHERE k.key_id = retire_sealing_key.key_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('no sealing key %L', retire_sealing_key.key_id),
            HINT = 'SELECT key_id, active, retired_at FROM pgml.sealing_keys lists them';
    END IF;
END $$;

-- Per key: how many unfinished jobs hold secrets sealed with it (a retired key's file may go at 0).
CREATE OR REPLACE VIEW pgml.sealing_key_use AS
SELECT k.key_id, k.active, k.created_at, k.retired_at,
       (SELECT count(*) FROM pgml.jobs j
        WHERE j.secrets LIKE 'v2:' || k.key_id || ':%' AND j.status IN ('submitting', 'queued', 'running'))
           AS pending_jobs
FROM pgml.sealing_keys k;

-- The OAEP label of block i of n of a job's secrets: binds the ciphertext to the job and the submitter.
CREATE OR REPLACE FUNCTION pgml._seal_label(job_id bigint, submitter text, i integer, n integer) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.convert_to('pgml-tuned:v2:' || job_id || ':' || submitter || ':' || i || '/' || n, 'UTF8') $$;

-- Seals a jsonb object of secrets for job `job_id` of `submitter` with the active key. NULL or '{}' -> NULL.
CREATE OR REPLACE FUNCTION pgml._seal(secrets jsonb, job_id bigint, submitter text) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sk       pgml.sealing_keys;
    max_len  integer;
    msg      bytea;
    n_blocks integer;
    blocks   text[] := '{}';
BEGIN
    IF secrets IS NULL OR secrets = '{}'::jsonb THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.jsonb_typeof(secrets) <> 'object' THEN
        RAISE EXCEPTION 'pgml._seal: secrets must be a jsonb object, not %', pg_catalog.jsonb_typeof(secrets)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO sk FROM pgml.sealing_keys k WHERE k.active;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = 'cannot seal the Hugging Face token: no sealing key is active',
            HINT = 'use a named credential instead ("hub_credential": "<name>", see pgml.allow_credential), or '
                   'an administrator registers a key: `pgml-tuned keys generate --out pgml-key.pem` then '
                   '`pgml-tuned keys register pgml-key.pem` (and copies the file into every worker''s keyring)';
    END IF;
    max_len := length(pgml._numeric_to_bytea(sk.n)) - 66;
    msg := pg_catalog.convert_to(secrets::text, 'UTF8');
    n_blocks := (length(msg) + max_len - 1) / max_len;
    FOR i IN 1 .. n_blocks LOOP
        blocks := blocks || pg_catalog.translate(pg_catalog.encode(
            pgml._oaep_encrypt(sk.n, sk.e, substring(msg FROM (i - 1) * max_len + 1 FOR max_len),
                               pgml._seal_label(job_id, submitter, i, n_blocks)),
            'base64'), E'\n', '');
    END LOOP;
    RETURN 'v2:' || sk.key_id || ':' || pg_catalog.array_to_string(blocks, '.');
END $$;

-- ---- named credentials ----------------------------------------------------------------------------------
-- A name is a file name on every worker: letters, digits, '_', '-', '.', not starting with '.' (no path
-- separator, never '.' or '..'). pgml_tuned.secrets.CREDENTIAL_NAME checks the same on the worker.
CREATE TABLE IF NOT EXISTS pgml.credentials (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by  name NOT NULL DEFAULT session_user
);
-- which roles may use which credential (a member of the role may: pg_has_role(..., 'MEMBER'))
CREATE TABLE IF NOT EXISTS pgml.credential_grants (
    credential  text NOT NULL REFERENCES pgml.credentials (name) ON DELETE CASCADE,
    role        name NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    granted_by  name NOT NULL DEFAULT session_user,
    PRIMARY KEY (credential, role)
);
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS credential text;  -- a name in pgml.credentials, never a token

-- May `who` use credential `credential`? (false for a role that no longer exists)
CREATE OR REPLACE FUNCTION pgml._may_use_credential(who text, credential text) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pgml.credential_grants g
                   JOIN pg_catalog.pg_roles r ON r.rolname = g.role
                   JOIN pg_catalog.pg_roles u ON u.rolname = who
                   WHERE g.credential = _may_use_credential.credential
                     AND pg_catalog.pg_has_role(u.oid, r.oid, 'MEMBER'))
$$;

-- Lets the members of `role` use credential `name` (created on first use). Administrators only.
CREATE OR REPLACE FUNCTION pgml.allow_credential(name text, role name) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._require_admin('allowing a credential');
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('%L is not a valid credential name', name),
            HINT = 'a credential is a file name on the workers: letters, digits, _ - and ., not starting with '
                   '. (e.g. ''my-org-token''), at most 128 characters';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = allow_credential.role) THEN
        RAISE EXCEPTION USING ERRCODE = 'undefined_object',
            MESSAGE = pg_catalog.format('role %I does not exist', role),
            HINT = 'name a login or a group role (e.g. pgml_user for everyone who may fine-tune)';
    END IF;
    INSERT INTO pgml.credentials (name) VALUES (allow_credential.name) ON CONFLICT DO NOTHING;
    INSERT INTO pgml.credential_grants (credential, role) VALUES (allow_credential.name, allow_credential.role)
    ON CONFLICT DO NOTHING;
END $$;

-- Takes a role's use of a credential back; returns whether it had it. Jobs of its members that have not
-- started yet fail when a worker claims them (the worker asks again at every attempt).
CREATE OR REPLACE FUNCTION pgml.revoke_credential(name text, role name) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._require_admin('revoking a credential');
    DELETE FROM pgml.credential_grants g WHERE g.credential = revoke_credential.name AND g.role = revoke_credential.role;
    RETURN FOUND;
END $$;

-- Forgets a credential name and every grant of it; returns whether it existed.
CREATE OR REPLACE FUNCTION pgml.drop_credential(name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgml._require_admin('dropping a credential');
    DELETE FROM pgml.credentials c WHERE c.name = drop_credential.name;
    RETURN FOUND;
END $$;

-- The worker, at the start of an attempt: the name of the job's credential, if its submitter may still use
-- it (an error saying why not otherwise); NULL for a job without one. Only for the attempt the caller owns.
CREATE OR REPLACE FUNCTION pgml.job_credential(job_id bigint, attempt integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job pgml.jobs;
BEGIN
    SELECT * INTO v_job FROM pgml.jobs j
    WHERE j.id = job_credential.job_id AND j.attempt = job_credential.attempt AND j.status = 'running';
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('job %s is not running attempt %s', job_credential.job_id,
                                        job_credential.attempt),
            HINT = 'only the worker that owns an attempt asks for its credential';
    END IF;
    IF v_job.credential IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgml.credentials c WHERE c.name = v_job.credential) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('credential %L no longer exists', v_job.credential),
            HINT = pg_catalog.format('an administrator allows it again (SELECT pgml.allow_credential(%L, %L)), '
                                     'then resubmit the job', v_job.credential, v_job.submitted_by);
    END IF;
    IF NOT pgml._may_use_credential(v_job.submitted_by, v_job.credential) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format('%s may no longer use credential %L', v_job.submitted_by, v_job.credential),
            HINT = pg_catalog.format('an administrator allows it again (SELECT pgml.allow_credential(%L, %L)), '
                                     'then resubmit the job', v_job.credential, v_job.submitted_by);
    END IF;
    RETURN v_job.credential;
END $$;

-- ---- pgml._submit as in 0008_security, with the credential checked and recorded, and the secrets sealed for
-- the job's id and submitter (the id is taken before the row is written)
CREATE OR REPLACE FUNCTION pgml._submit(
    project_name         text,
    task                 text,
    relation_name        text,
    y_column_name        text,
    model_name           text,
    hyperparams          jsonb,
    test_size            double precision,
    test_sampling        text,
    automatic_deploy     boolean,
    materialize_snapshot boolean,
    max_attempts         integer,
    priority             integer,
    caller_search_path   text,
    rel                  oid,   -- relation_name as the caller resolved it (NULL: not found)
    rel_error            text   -- why the caller could not resolve it, if it could not
) RETURNS TABLE (job_id bigint, project_id bigint, model_id bigint, relation text, columns text[])
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_task     text := _submit.task;
    v_project  pgml.projects;
    v_rel      regclass;
    v_relkind  "char";
    v_schema   text;
    v_table    text;
    v_hp       jsonb := coalesce(_submit.hyperparams, '{}');
    v_clean    jsonb;
    v_secrets  jsonb;
    v_sealed   text;
    v_dargs    jsonb;
    v_taskrow  pgml.tasks;
    v_arg      text;
    v_col      text;
    v_model_id bigint;
    v_job_id   bigint;
    v_known    text;
    v_cols     text[] := '{}';
    v_admin    boolean := pg_has_role(session_user, 'pgml_admin', 'MEMBER');
    v_relname  text;
    v_cred     text;
BEGIN
    -- project and task
    IF project_name IS NULL OR btrim(project_name) = '' THEN
        PERFORM pgml._fail('project_name is required', 'pass a name, e.g. pgml.tune(''my_project'', ...)');
    END IF;
    SELECT * INTO v_project FROM pgml.projects p WHERE p.name = project_name AND p.owner = session_user;
    IF v_task IS NULL THEN
        v_task := v_project.task;
        IF v_task IS NULL THEN
            PERFORM pgml._fail(format('task is required: project %L does not exist yet', project_name),
                               'pass task => ''text-classification'' (or another task in pgml.tasks)');
        END IF;
    END IF;
    SELECT * INTO v_taskrow FROM pgml.tasks t WHERE t.name = v_task;
    IF NOT FOUND THEN
        SELECT string_agg(quote_literal(t.name), ', ' ORDER BY t.name) INTO v_known FROM pgml.tasks t;
        PERFORM pgml._fail(format('unknown task %L', v_task), format('tasks are: %s', v_known));
    END IF;
    IF v_taskrow.admin_only AND NOT v_admin THEN
        PERFORM pgml._fail(format('task %L is a diagnostic task for administrators', v_task),
                           format('a member of pgml_admin may run it (GRANT pgml_admin TO %I)', session_user),
                           'insufficient_privilege');
    END IF;
    IF priority > 0 AND NOT v_admin THEN
        PERFORM pgml._fail(format('priority %s: a priority above 0 is for administrators', priority),
                           'leave priority out (0), or ask a member of pgml_admin to raise it', 'insufficient_privilege');
    END IF;
    IF v_project.task IS NOT NULL AND v_project.task <> v_task THEN
        PERFORM pgml._fail(format('project %L is a %s project, not %s', project_name, v_project.task, v_task),
                           'use another project_name for another task');
    END IF;

    -- hyperparams
    IF jsonb_typeof(v_hp) <> 'object' THEN
        PERFORM pgml._fail(format('hyperparams must be a JSON object, got a JSON %s', jsonb_typeof(v_hp)),
                           'e.g. hyperparams => ''{"training_args": {"num_train_epochs": 1}}''');
    END IF;
    FOR v_arg IN SELECT k FROM jsonb_object_keys(v_hp) k
                 WHERE k <> ALL (v_taskrow.hyperparams || pgml._secret_keys() || 'hub_credential'::text) LOOP
        PERFORM pgml._fail(format('unknown hyperparams key %L for task %s', v_arg, v_task),
                           format('keys for %s are: %s', v_task, array_to_string(v_taskrow.hyperparams, ', ')));
    END LOOP;
    FOREACH v_arg IN ARRAY ARRAY['training_args', 'dataset_args', 'lora_config'] LOOP
        IF v_hp ? v_arg AND jsonb_typeof(v_hp -> v_arg) <> 'object' THEN
            PERFORM pgml._fail(format('hyperparams.%s must be a JSON object, got a JSON %s', v_arg,
                                      jsonb_typeof(v_hp -> v_arg)),
                               format('e.g. "%s": {"key": "value"}', v_arg));
        END IF;
    END LOOP;

    -- test split
    IF test_size IS NULL OR test_size <= 0 OR test_size = 1 OR (test_size > 1 AND test_size <> trunc(test_size))
    THEN
        PERFORM pgml._fail(format('test_size %s is out of range', coalesce(test_size::text, 'NULL')),
            'use a fraction between 0 and 1 (0.2 = 20% of rows for evaluation) or a whole row count of at least 2');
    END IF;
    IF test_sampling IS NULL OR test_sampling NOT IN ('last', 'random', 'stratified') THEN
        PERFORM pgml._fail(format('unknown test_sampling %L', test_sampling),
                           'use ''last'' (relation order), ''random'' or ''stratified'' (by class)');
    END IF;
    IF model_name IS NULL OR btrim(model_name) = '' THEN
        PERFORM pgml._fail('model_name is required',
            'pass a Hugging Face model id, a directory on the workers, or pgml:<project> / pgml:model:<id>');
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        PERFORM pgml._fail('max_attempts must be at least 1', 'max_attempts => 3 retries a job whose worker died');
    END IF;

    -- relation and columns
    IF v_task <> 'noop' OR relation_name IS NOT NULL THEN
        IF relation_name IS NULL OR btrim(relation_name) = '' THEN
            PERFORM pgml._fail('relation_name is required', 'pass the table or view to train on, e.g. ''public.reviews''');
        END IF;
        IF rel_error IS NOT NULL THEN
            PERFORM pgml._fail(format('relation_name %L is not a valid relation name: %s', relation_name, rel_error),
                               'write schema.table, double-quoting names that need it: ''"My Schema"."My Table"''');
        END IF;
        v_rel := rel;
        IF v_rel IS NULL THEN
            PERFORM pgml._fail(format('relation %L does not exist', relation_name),
                'check the spelling and schema (search_path is ' || coalesce(caller_search_path, '') || ')',
                'undefined_table');
        END IF;
        SELECT c.relkind, n.nspname, c.relname INTO v_relkind, v_schema, v_table
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = v_rel;
        IF v_relkind NOT IN ('r', 'v', 'm', 'p', 'f') THEN
            PERFORM pgml._fail(format('%s is not a table or view', v_rel), 'pass a table, view or materialized view');
        END IF;
        IF NOT has_table_privilege(session_user, v_rel, 'SELECT') THEN
            PERFORM pgml._fail(format('permission denied: %s may not SELECT from %s', session_user, v_rel),
                               format('GRANT SELECT ON %s TO %I', v_rel, session_user), 'insufficient_privilege');
        END IF;
        v_relname := format('%I.%I', v_schema, v_table);
        v_dargs := coalesce(v_hp -> 'dataset_args', '{}');
        FOR v_arg, v_col IN SELECT key, value FROM jsonb_each_text(v_taskrow.required_columns) LOOP
            v_col := coalesce(v_dargs ->> v_arg, CASE WHEN v_arg = 'class_column' THEN y_column_name END, v_col);
            IF v_col IS NULL THEN
                PERFORM pgml._fail(format('dataset_args.%s is required for task %s', v_arg, v_task),
                    format('set "dataset_args": {"%s": "<column>"} in hyperparams (or y_column_name)', v_arg));
            END IF;
            PERFORM pgml._check_column(v_rel, v_arg, v_col, v_arg = ANY (v_taskrow.text_columns));
            v_cols := v_cols || v_col;
        END LOOP;
        FOREACH v_arg IN ARRAY v_taskrow.optional_columns LOOP
            IF v_dargs ? v_arg THEN
                PERFORM pgml._check_column(v_rel, v_arg, v_dargs ->> v_arg, v_arg = ANY (v_taskrow.text_columns));
                v_cols := v_cols || (v_dargs ->> v_arg);
            END IF;
        END LOOP;
        IF y_column_name IS NOT NULL AND NOT v_dargs ? 'class_column' AND v_taskrow.required_columns ? 'class_column'
        THEN
            v_hp := jsonb_set(v_hp, '{dataset_args}', v_dargs || jsonb_build_object('class_column', y_column_name));
        END IF;
    END IF;

    -- secrets: a named credential the caller may use (recorded by name), or inline tokens sealed for this job
    -- and this submitter with the active sealing key; removed from everything stored in clear
    SELECT s.clean, s.secrets INTO v_clean, v_secrets FROM pgml._split_secrets(v_hp) s;
    IF v_clean ? 'hub_credential' THEN
        IF jsonb_typeof(v_clean -> 'hub_credential') <> 'string' THEN
            PERFORM pgml._fail('hyperparams.hub_credential must be a credential name (a JSON string)',
                               'e.g. "hub_credential": "my-org-token"');
        END IF;
        v_cred := v_clean ->> 'hub_credential';
        v_clean := v_clean - 'hub_credential';
        IF v_secrets <> '{}' THEN
            PERFORM pgml._fail('hyperparams has both hub_credential and an inline token',
                               'pass one: "hub_credential": "<name>" (recommended) or the token');
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pgml.credentials c WHERE c.name = v_cred) THEN
            PERFORM pgml._fail(format('unknown credential %L', v_cred),
                format('an administrator creates it on the workers and allows it: SELECT pgml.allow_credential(%L, %L)',
                       v_cred, session_user), 'undefined_object');
        END IF;
        IF NOT pgml._may_use_credential(session_user, v_cred) THEN
            PERFORM pgml._fail(format('permission denied: %s may not use credential %L', session_user, v_cred),
                format('ask an administrator: SELECT pgml.allow_credential(%L, %L)', v_cred, session_user),
                'insufficient_privilege');
        END IF;
    END IF;
    v_job_id := nextval(pg_get_serial_sequence('pgml.jobs', 'id'));
    IF v_secrets <> '{}' THEN
        v_sealed := pgml._seal(v_secrets, v_job_id, session_user);
    END IF;

    INSERT INTO pgml.projects AS p (name, task, owner) VALUES (project_name, v_task, session_user)
    ON CONFLICT (owner, name) DO UPDATE SET updated_at = clock_timestamp()
    RETURNING * INTO v_project;

    INSERT INTO pgml.models (project_id, task, model_name, relation_name, hyperparams, owner)
    VALUES (v_project.id, v_task, _submit.model_name, _submit.relation_name, v_clean, session_user)
    RETURNING id INTO v_model_id;

    -- 'submitting': invisible to workers until pgml._submitted() has seen the rows arrive
    INSERT INTO pgml.jobs (id, project_id, model_id, task, relation_name, relation_schema, relation_table,
                           model_name, test_size, test_sampling, hyperparams, secrets, credential, priority,
                           max_attempts, status, submitted_by, snapshot_columns, keep_snapshot)
    VALUES (v_job_id, v_project.id, v_model_id, v_task, _submit.relation_name, v_schema, v_table,
            _submit.model_name, _submit.test_size, _submit.test_sampling, v_clean, v_sealed, v_cred,
            _submit.priority, _submit.max_attempts, 'submitting', session_user,
            CASE WHEN v_relname IS NOT NULL THEN v_cols END, coalesce(materialize_snapshot, false));

    RETURN QUERY SELECT v_job_id, v_project.id, v_model_id, v_relname, v_cols;
END $$;

-- noop (the administrators' diagnostic task) can check that a job's token reaches its child: with
-- "expect_token_sha256": "<hex>" it fails unless sha256 of the token it was given is that (the token itself
-- is never shown). E.g. after adding a credential file to the workers.
UPDATE pgml.tasks SET hyperparams = hyperparams || 'expect_token_sha256'::text
WHERE name = 'noop' AND NOT 'expect_token_sha256' = ANY (hyperparams);

-- ---- row-level security, ownership, privileges ----------------------------------------------------------
ALTER TABLE pgml.sealing_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.credentials ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgml.credential_grants ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS admin_read ON pgml.sealing_keys;
CREATE POLICY admin_read ON pgml.sealing_keys FOR SELECT TO pgml_admin USING (true);
-- a user sees the credentials (and grants) they may use; an administrator all
DROP POLICY IF EXISTS user_read ON pgml.credentials;
CREATE POLICY user_read ON pgml.credentials FOR SELECT TO pgml_user
    USING (pg_has_role(session_user, 'pgml_admin', 'MEMBER')
           OR EXISTS (SELECT 1 FROM pgml.credential_grants g JOIN pg_roles r ON r.rolname = g.role
                      WHERE g.credential = credentials.name AND pg_has_role(session_user, r.oid, 'MEMBER')));
DROP POLICY IF EXISTS user_read ON pgml.credential_grants;
CREATE POLICY user_read ON pgml.credential_grants FOR SELECT TO pgml_user
    USING (pg_has_role(session_user, 'pgml_admin', 'MEMBER')
           OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = credential_grants.role
                      AND pg_has_role(session_user, r.oid, 'MEMBER')));

SELECT pgml._own_everything();
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT p.oid::regprocedure AS sig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgml' AND p.prokind = 'f' AND p.proname NOT IN ('_tune_request')
               AND NOT coalesce(p.proconfig, '{}') && ARRAY['search_path=pg_catalog, pg_temp'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', r.sig);
    END LOOP;
END $$;

REVOKE ALL ON pgml.sealing_keys, pgml.credentials, pgml.credential_grants, pgml.sealing_key_use FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgml FROM PUBLIC;
-- the workers no longer register keys
REVOKE EXECUTE ON FUNCTION pgml._key_fingerprint(numeric), pgml._numeric_to_bytea(numeric, integer) FROM pgml_worker;
GRANT SELECT ON pgml.sealing_keys, pgml.sealing_key_use TO pgml_admin;
GRANT SELECT ON pgml.credentials, pgml.credential_grants TO pgml_user;
GRANT EXECUTE ON FUNCTION pgml.register_sealing_key(numeric, numeric, boolean), pgml.activate_sealing_key(text),
    pgml.retire_sealing_key(text), pgml.allow_credential(text, name), pgml.revoke_credential(text, name),
    pgml.drop_credential(text) TO pgml_admin;
GRANT EXECUTE ON FUNCTION pgml.job_credential(bigint, integer) TO pgml_worker;

INSERT INTO pgml.schema_migrations (version) VALUES ('0009_secrets') ON CONFLICT DO NOTHING;
