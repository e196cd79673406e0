-- 0013_loopback: calls that must answer synchronously (pgml.transform, pgml.load_dataset) need a request that
-- the worker can see before the caller's transaction commits. They submit it through an autonomous loopback
-- connection (dblink) and then wait for the worker's answer (READ COMMITTED sees its commit).
--
-- The loopback logs in as a login of its own (one per database: pgml_loopback_<database oid>) whose random
-- password lives in pgml.loopback_login, a table only pgml_owner may read: no user's password is stored, and no
-- user can read this one. dblink is installed (when the migrating role may) in schema pgml_dblink, which only
-- pgml_owner may use, so users cannot reach the loopback connection their session holds. Where dblink was
-- installed elsewhere beforehand, the connection is still safe to share: nothing secret crosses it. Every
-- statement carries a proof, sha256(secret : user : remote backend pid : nonce), that the loopback's side
-- checks (pgml._submitter()); a proof names the session's own user and the loopback backend it was made
-- for, so it lets nobody act as anyone else.
--
-- On a server that does not ask the loopback for a password (trust), dblink refuses non-superusers unless
-- they may call dblink_connect_u: a superuser's migration grants that to pgml_owner (alone).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'dblink') THEN
        BEGIN
            CREATE SCHEMA IF NOT EXISTS pgml_dblink;
            CREATE EXTENSION dblink SCHEMA pgml_dblink;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'dblink could not be installed (%): pgml.transform and pgml.load_dataset need it; '
                         'ask an administrator to run CREATE EXTENSION dblink, then pgml-tuned migrate again',
                         SQLERRM;
        END;
    END IF;
END $$;

DO $$
BEGIN
    CREATE ROLE pgml_loopback NOLOGIN;  -- the group of every database's loopback login
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END $$;

CREATE TABLE IF NOT EXISTS pgml.loopback_login (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),  -- one row
    login     name NOT NULL,
    password  text NOT NULL,
    secret    text NOT NULL,
    conninfo  text NOT NULL,   -- host and port of this server as seen from itself (an administrator may change it)
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- ---- deployments --------------------------------------------------------------------------------------------
-- What a project serves (pgml:<project>): its deployed model. PostgresML's rule: a new successful model is
-- deployed automatically (unless its job said automatic_deploy => false) when its key metric beats the deployed
-- one's (eval_accuracy, else eval_f1, higher is better; eval_loss for conversation, lower is better), or when
-- nothing is deployed yet. pgml.deploy(project, model_id) chooses by hand.
ALTER TABLE pgml.jobs ADD COLUMN IF NOT EXISTS automatic_deploy boolean NOT NULL DEFAULT true;

CREATE TABLE IF NOT EXISTS pgml.deployments (
    id         bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES pgml.projects (id) ON DELETE CASCADE,
    model_id   bigint NOT NULL REFERENCES pgml.models (id) ON DELETE CASCADE,
    strategy   text NOT NULL DEFAULT 'manual',  -- 'automatic', 'model_id', 'best_score', 'most_recent', 'rollback'
    deployed_by name NOT NULL DEFAULT session_user,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS deployments_project_idx ON pgml.deployments (project_id, id DESC);
ALTER TABLE pgml.deployments ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS own_deployments ON pgml.deployments;
CREATE POLICY own_deployments ON pgml.deployments FOR SELECT
    USING (EXISTS (SELECT 1 FROM pgml.projects p WHERE p.id = project_id
                   AND (p.owner = session_user OR pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER'))));

-- Existing projects: their best model so far is what they serve.
INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by)
SELECT DISTINCT ON (m.project_id) m.project_id, m.id, 'automatic', m.owner
FROM pgml.models m LEFT JOIN LATERAL (  -- what pgml._key_metric said at 0013, inline: functions come after migrations
    SELECT CASE WHEN m.task IN ('conversation', 'text-generation') THEN (m.metrics ->> 'eval_loss')::double precision
                ELSE coalesce((m.metrics ->> 'eval_accuracy')::double precision,
                              (m.metrics ->> 'eval_f1')::double precision) END AS value,
           m.task NOT IN ('conversation', 'text-generation') AS higher) k ON true
WHERE m.status = 'successful' AND NOT EXISTS (SELECT 1 FROM pgml.deployments d WHERE d.project_id = m.project_id)
ORDER BY m.project_id, CASE WHEN k.higher THEN -k.value ELSE k.value END NULLS LAST, m.id DESC;

INSERT INTO pgml.schema_migrations (version) VALUES ('0013_loopback') ON CONFLICT DO NOTHING;
