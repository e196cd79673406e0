-- 0002_secrets: Hugging Face tokens are never stored in plain text.
-- Plain SQL, idempotent, runnable with psql: psql "$DSN" -v ON_ERROR_STOP=1 -f sql/migrations/0002_secrets.sql
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
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
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

-- Non-negative numeric integer -> unsigned big-endian bytes, left-padded with zero bytes to exactly `len`
-- bytes (an error if it does not fit); with len NULL (or omitted): the minimal length (at least one byte).
CREATE OR REPLACE FUNCTION pgml._numeric_to_bytea(v numeric, len integer DEFAULT NULL) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    x   numeric := v;
    h   text := '';
    two56 CONSTANT numeric := 72057594037927936;  -- 2^56
BEGIN
    IF v IS NULL THEN
        RETURN NULL;
    END IF;
    IF v < 0 OR v <> trunc(v) THEN
        RAISE EXCEPTION 'pgml._numeric_to_bytea: needs a non-negative integer'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    x := trunc(x);
    WHILE x > 0 LOOP
        h := lpad(to_hex(mod(x, two56)::bigint), 14, '0') || h;
        x := div(x, two56);
    END LOOP;
    h := ltrim(h, '0');
    IF length(h) % 2 = 1 THEN
        h := '0' || h;
    END IF;
    IF len IS NULL THEN
        IF h = '' THEN
            h := '00';
        END IF;
    ELSIF length(h) > 2 * len THEN
        RAISE EXCEPTION 'pgml._numeric_to_bytea: the integer does not fit in % bytes', len
            USING ERRCODE = 'numeric_value_out_of_range';
    ELSE
        h := lpad(h, 2 * len, '0');
    END IF;
    RETURN decode(h, 'hex');
END $$;

-- base^exponent mod modulus, by square-and-multiply on numeric integers (exact at any size).
CREATE OR REPLACE FUNCTION pgml._modpow(base numeric, exponent numeric, modulus numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
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

-- `count` uniformly random bytes in 1..255, from gen_random_uuid() (built in since PostgreSQL 13; backed by
-- the server's cryptographically strong random source). Of the 16 bytes of a v4 UUID, bytes 6 (version
-- nibble) and 8 (variant bits) are not fully random and are skipped; zero bytes are rejected.
CREATE OR REPLACE FUNCTION pgml._random_nonzero_bytes(count integer) RETURNS bytea
LANGUAGE plpgsql VOLATILE STRICT PARALLEL SAFE AS $$
DECLARE
    h   text := '';
    u   bytea;
    i   integer;
    bt  integer;
BEGIN
    WHILE length(h) < 2 * count LOOP
        u := uuid_send(gen_random_uuid());
        FOR i IN 0 .. 15 LOOP
            CONTINUE WHEN i = 6 OR i = 8;
            bt := get_byte(u, i);
            CONTINUE WHEN bt = 0;
            h := h || lpad(to_hex(bt), 2, '0');
            EXIT WHEN length(h) >= 2 * count;
        END LOOP;
    END LOOP;
    RETURN decode(h, 'hex');
END $$;

-- The key fingerprint: first 16 hex characters of sha256 over the minimal big-endian bytes of n.
CREATE OR REPLACE FUNCTION pgml._key_fingerprint(n numeric) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT left(encode(sha256(pgml._numeric_to_bytea(n)), 'hex'), 16)
$$;

-- Public keys of the workers. The newest row (created_at) is the sealing key. Registered by the daemon
-- (`pgml-tuned migrate` / `pgml-tuned serve`); the public key is not a secret.
CREATE TABLE IF NOT EXISTS pgml.worker_keys (
    fingerprint text PRIMARY KEY,
    n           numeric NOT NULL CHECK (n > 0 AND scale(n) = 0),
    e           numeric NOT NULL CHECK (e >= 3 AND scale(e) = 0 AND mod(e, 2) = 1),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT worker_keys_fingerprint_matches CHECK (fingerprint = pgml._key_fingerprint(n))
);

-- Seals a jsonb object of secrets for the workers. NULL or '{}' -> NULL.
CREATE OR REPLACE FUNCTION pgml._seal(secrets jsonb) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp  -- safe to call from SECURITY DEFINER functions
AS $$
DECLARE
    wk       record;
    k        integer;            -- modulus length in bytes
    max_len  integer;            -- message bytes per block
    msg      bytea;
    chunk    bytea;
    em       bytea;
    pos      integer := 0;
    blocks   text[] := '{}';
BEGIN
    IF secrets IS NULL OR secrets = '{}'::jsonb THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(secrets) <> 'object' THEN
        RAISE EXCEPTION 'pgml._seal: secrets must be a jsonb object, not %', jsonb_typeof(secrets)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT w.fingerprint, w.n, w.e INTO wk
    FROM pgml.worker_keys w
    ORDER BY w.created_at DESC, w.fingerprint
    LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = 'cannot store the Hugging Face token: no worker key is registered',
            HINT = 'run `pgml-tuned migrate` (or start `pgml-tuned serve`) once on a worker: '
                   'it registers the public key that seals tokens';
    END IF;

    k := length(pgml._numeric_to_bytea(wk.n));
    max_len := k - 11;
    IF max_len < 1 THEN
        RAISE EXCEPTION 'pgml._seal: worker key % is too small to seal anything', wk.fingerprint
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    msg := convert_to(secrets::text, 'UTF8');
    WHILE pos < length(msg) LOOP
        chunk := substring(msg FROM pos + 1 FOR max_len);
        em := decode('0002', 'hex') || pgml._random_nonzero_bytes(k - 3 - length(chunk))
              || decode('00', 'hex') || chunk;
        blocks := blocks || replace(encode(
            pgml._numeric_to_bytea(pgml._modpow(pgml._bytea_to_numeric(em), wk.e, wk.n), k),
            'base64'), E'\n', '');
        pos := pos + max_len;
    END LOOP;
    RETURN 'rsa1:' || wk.fingerprint || ':' || array_to_string(blocks, '.');
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0002_secrets') ON CONFLICT DO NOTHING;
