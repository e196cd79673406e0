
-- Public keys of the workers. The newest row (created_at) is the sealing key. Registered by the daemon
-- (`pgml-tuned migrate` / `pgml-tuned serve`); the public key is not a secret.
CREATE TABLE IF NOT EXISTS pgml.worker_keys (
    fingerprint text PRIMARY KEY,
    n           numeric NOT NULL CHECK (n > 0 AND scale(n) = 0),
    e           numeric NOT NULL CHECK (e >= 3 AND scale(e) = 0 AND mod(e, 2) = 1),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT worker_keys_fingerprint_matches CHECK (fingerprint = pgml._key_fingerprint(n))
);

INSERT INTO pgml.schema_migrations (version) VALUES ('0002_secrets') ON CONFLICT DO NOTHING;
