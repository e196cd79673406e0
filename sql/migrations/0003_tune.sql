-- 0003_tune: pgml.tune(), the PostgresML-compatible entry point. It validates what SQL can check, queues a job
-- and NOTIFYs the workers, then returns at once. Nothing is queued when it raises.
-- Plain SQL, idempotent, runnable with psql.

-- Tasks the workers know, with the dataset_args each one reads. Adding a task = a recipe module + a row here.
CREATE TABLE IF NOT EXISTS pgml.tasks (
    name             text PRIMARY KEY,
    required_columns jsonb NOT NULL,   -- {"dataset_args key": "default column name or null"}
    text_columns     text[] NOT NULL,  -- dataset_args keys whose columns must be of a string type
    optional_columns text[] NOT NULL DEFAULT '{}',
    hyperparams      text[] NOT NULL DEFAULT '{}'  -- top-level hyperparams keys the task reads
);
INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams) VALUES
    ('text-classification', '{"text_column": "text", "class_column": null}', '{text_column}', '{}',
        '{training_args,dataset_args,max_seq_length}'),
    ('text-pair-classification', '{"text1_column": "text1", "text2_column": "text2", "class_column": null}',
        '{text1_column,text2_column}', '{}', '{training_args,dataset_args,max_seq_length}'),
    ('conversation', '{"user_column": "user", "assistant_column": "assistant"}',
        '{user_column,assistant_column,system_column}', '{system_column}',
        '{training_args,dataset_args,lora_config,load_in_8bit,load_in_4bit,max_seq_length,prompt_template,'
        'train_on,packing,torch_dtype,attn_implementation}'),
    -- a diagnostic task: runs a child process that sleeps hyperparams.seconds; used to test queues and ops
    ('noop', '{}', '{}', '{}', '{seconds,steps,fail}')
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams;

DROP FUNCTION IF EXISTS pgml.tune(text, text, text, text, text, jsonb, double precision, text, boolean, boolean, integer,
                                  integer);

INSERT INTO pgml.schema_migrations (version) VALUES ('0003_tune') ON CONFLICT DO NOTHING;
