-- 0040_retrieval_tasks: two training tasks for retrieval, trained with sentence-transformers
-- (pgml_tuned/recipes/text_embedding.py, text_ranking.py):
--   text-embedding  an embedding model (bi-encoder) from (anchor, positive) pairs, optionally a hard negative or a
--                   graded score per pair; stored in the sentence-transformers layout
--   text-ranking    a reranker (cross-encoder) from (query, document, label) rows
-- pgml.tune checks their columns and rows at submit (pgml._check_retrieval_args, pgml._check_retrieval_rows).
-- Plain SQL, idempotent, runnable with psql.

INSERT INTO pgml.tasks (name, required_columns, text_columns, optional_columns, hyperparams) VALUES
    ('text-embedding', '{"anchor_column": "anchor", "positive_column": "positive"}',
     '{anchor_column,positive_column,negative_column}', '{negative_column,score_column}',
     '{training_args,dataset_args,max_seq_length,resources}'),
    ('text-ranking', '{"query_column": "query", "document_column": "document", "label_column": "label"}',
     '{query_column,document_column}', '{}', '{training_args,dataset_args,max_seq_length,resources}')
ON CONFLICT (name) DO UPDATE SET required_columns = EXCLUDED.required_columns,
    text_columns = EXCLUDED.text_columns, optional_columns = EXCLUDED.optional_columns,
    hyperparams = EXCLUDED.hyperparams;

INSERT INTO pgml.schema_migrations (version) VALUES ('0040_retrieval_tasks') ON CONFLICT DO NOTHING;
