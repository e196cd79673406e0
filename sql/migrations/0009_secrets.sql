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

INSERT INTO pgml.schema_migrations (version) VALUES ('0009_secrets') ON CONFLICT DO NOTHING;
