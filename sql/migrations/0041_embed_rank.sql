-- 0041_embed_rank: retrieval in the inference lane (issue 21). pgml.embed and pgml.rank are requests of two new
-- kinds, answered by the serving process as classify / generate are (warm cache, dynamic batching across sessions,
-- the same admission and fair claim): 'embed' (texts → vectors, a SentenceTransformer) and 'rank' (a query and
-- its documents → one score per document, a CrossEncoder; inputs are [query, document, ...]).
-- pgml.embed_batch queues a job of task 'embed_batch', pgml.predict_batch's machinery writing (key, embedding
-- real[]) into pgml.<output_table>. Plain SQL, idempotent.

ALTER TABLE pgml.requests DROP CONSTRAINT IF EXISTS requests_kind_check;
ALTER TABLE pgml.requests ADD CONSTRAINT requests_kind_check
    CHECK (kind IN ('classify', 'generate', 'chat', 'embed', 'rank'));

INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams) VALUES
    ('embed_batch', '{"text_column": "text", "key_column": "id"}', '{text_column}', '{}',
     '{dataset_args,output_table,batch_size,kwargs,resources}')
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams;

INSERT INTO pgml.schema_migrations (version) VALUES ('0041_embed_rank') ON CONFLICT DO NOTHING;
