-- 0016_predict_batch: predictions over a whole table, as a job. pgml.predict_batch(model, relation, output_table,
-- ...) queues a job of task 'predict_batch' through pgml.tune (the rows are read at submit, in the caller's
-- session, with the caller's rights: key and text). Its child classifies them in batches and COPYs
-- (key, label, score) into pgml.<output_table>, a table pgml_owner owns and the submitter may read (the worker
-- never writes into a user's table: a user's trigger there would run as the worker). Progress, logs, cancel and
-- CALL pgml.wait work as for training.

INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams) VALUES
    ('predict_batch', '{"text_column": "text", "key_column": "id"}', '{text_column}', '{}',
     '{dataset_args,output_table,batch_size,max_length}')
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams;

-- Tables pgml-tuned made for users' results (predictions), so that a name is reused only by its owner.
CREATE TABLE IF NOT EXISTS pgml.output_tables (
    name       text PRIMARY KEY,     -- pgml.<name>
    kind       text NOT NULL,        -- 'predictions'
    owner      name NOT NULL,
    job_id     bigint,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE pgml.output_tables ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS own_outputs ON pgml.output_tables;
CREATE POLICY own_outputs ON pgml.output_tables FOR SELECT
    USING (owner = session_user OR pg_catalog.pg_has_role(session_user, 'pgml_admin', 'MEMBER'));

INSERT INTO pgml.schema_migrations (version) VALUES ('0016_predict_batch') ON CONFLICT DO NOTHING;
