-- Secrets: sealing keys (RSA-OAEP in PL/pgSQL), inline tokens sealed at submit, named credentials and who may use
-- them.
--
-- Re-applied by every `pgml-tuned migrate` (after sql/migrations, in the same transaction): edit the
-- definition here, and only here. Grants are in 90_grants.sql.

-- (since 0002) Hugging Face tokens are never stored in plain text.
--
-- Workers own an RSA key pair (daemon/pgml_tuned/secrets.py); they register the public half in
-- pgml.worker_keys. pgml._seal() encrypts a jsonb object of secrets with the newest registered key, in pure
-- PL/pgSQL (no extensions: runs on any managed PostgreSQL 14+), with PKCS#1 v1.5 type-2 padding:
--     EM = 0x00 0x02 || PS (>= 8 random nonzero bytes) || 0x00 || M,   C = EM^e mod n
-- The UTF-8 text of the object is cut into blocks of at most k - 11 bytes (k = byte length of n; 256 - 11 =
-- 245 bytes for RSA-2048), each encrypted separately. Sealed format:
--     'rsa1:' || fingerprint || ':' || base64(C_1) || '.' || base64(C_2) ...
-- with every C_i exactly k bytes, big-endian. The fingerprint is the first 16 hex characters of
-- sha256(big-endian minimal bytes of n). Only the daemon, holding the private key, can unseal.
--
-- Nothing here RAISEs, NOTICEs or logs a plaintext; errors name no secret value.

-- Unsigned big-endian bytes -> numeric integer. 7 bytes (56 bits) at a time through bigint.
CREATE OR REPLACE FUNCTION pgml._bytea_to_numeric(b bytea) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v     numeric := 0;
    len   integer := length(b);
    pos   integer := 0;       -- bytes consumed
    step  integer;
BEGIN
    WHILE pos < len LOOP
        step := least(7, len - pos);
        v := v * (1::bigint << (8 * step))
             + ('x' || lpad(encode(substring(b FROM pos + 1 FOR step), 'hex'), 16, '0'))::bit(64)::bigint;
        pos := pos + step;
    END LOOP;
    RETURN v;
END $$;

-- base^exponent mod modulus, by square-and-multiply on numeric integers (exact at any size).
CREATE OR REPLACE FUNCTION pgml._modpow(base numeric, exponent numeric, modulus numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result numeric := 1;
    b      numeric;
    x      numeric := exponent;
BEGIN
    IF modulus < 1 OR exponent < 0 THEN
        RAISE EXCEPTION 'pgml._modpow: needs modulus >= 1 and exponent >= 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF modulus = 1 THEN
        RETURN 0;
    END IF;
    b := mod(base, modulus);
    IF b < 0 THEN
        b := b + modulus;
    END IF;
    WHILE x > 0 LOOP
        IF mod(x, 2) = 1 THEN
            result := mod(result * b, modulus);
        END IF;
        x := div(x, 2);
        IF x > 0 THEN
            b := mod(b * b, modulus);
        END IF;
    END LOOP;
    RETURN result;
END $$;

-- (since 0006) NOTIFY payloads become typed JSON, and the names of secret hyperparams live in one place.
--
-- pgml_jobs    {"type": "job_queued", "id": N}, sent by the jobs trigger whenever a job becomes queued (submitted,
--              requeued after a SIGTERM, or put back by the reaper), so an idle worker wakes at once in every case.
-- pgml_control {"type": "cancel_requested", "id": N}, sent by pgml.cancel() for a running job.
-- A payload only wakes a worker: what it does comes from the rows it reads (cancel_requested, status).
-- (Since issue 20 no payload names a job, 55_jobs.sql: {"type": "job_queued", "nonce": <random uuid>} and
-- {"type": "cancel_requested"}; any session may LISTEN on any channel.)

-- The hyperparams keys (at the top level and inside training_args) whose values are secrets: sealed at submit,
-- never stored in clear. Python reads the same list (pgml_tuned.secrets.SECRET_KEYS; a test checks they agree).
CREATE OR REPLACE FUNCTION pgml._secret_keys() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT ARRAY['token', 'hub_token', 'use_auth_token'] $$;

CREATE OR REPLACE FUNCTION pgml._split_secrets(hyperparams jsonb, OUT clean jsonb, OUT secrets jsonb)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
BEGIN
    clean := hyperparams;
    secrets := '{}';
    FOREACH k IN ARRAY pgml._secret_keys() LOOP
        IF clean ? k THEN
            secrets := secrets || jsonb_build_object(k, clean -> k);
            clean := clean - k;
        END IF;
        IF jsonb_typeof(clean -> 'training_args') = 'object' AND clean -> 'training_args' ? k THEN
            secrets := secrets || jsonb_build_object('training_args.' || k, clean -> 'training_args' -> k);
            clean := jsonb_set(clean, '{training_args}', (clean -> 'training_args') - k);
        END IF;
    END LOOP;
END $$;

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
-- (security_invoker: read with the caller's rights, row-level security on both tables: administrators only.)
CREATE OR REPLACE VIEW pgml.sealing_key_use WITH (security_invoker = true) AS
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
