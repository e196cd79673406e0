-- The functions that tables' constraints call (pgml.sealing_keys checks that key_id is the fingerprint of its
-- modulus): applied before sql/migrations by every `pgml-tuned migrate`, so that a migration can create a table
-- that uses them, and once more never hurts. Schema pgml is created here for a new database.
CREATE SCHEMA IF NOT EXISTS pgml;

-- Non-negative numeric integer -> unsigned big-endian bytes, left-padded with zero bytes to exactly `len`
-- bytes (an error if it does not fit); with len NULL (or omitted): the minimal length (at least one byte).
CREATE OR REPLACE FUNCTION pgml._numeric_to_bytea(v numeric, len integer DEFAULT NULL) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
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

-- The key fingerprint: first 16 hex characters of sha256 over the minimal big-endian bytes of n.
CREATE OR REPLACE FUNCTION pgml._key_fingerprint(n numeric) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT left(encode(sha256(pgml._numeric_to_bytea(n)), 'hex'), 16)
$$;
