-- 0044_embed_vectors: pgml.embed's answers as float4 arrays, not JSON (issue 21: 1,000 texts at >= 0.9x the
-- throughput of SentenceTransformer.encode in one process).
--
-- * pgml.requests.vectors (real[]): an embed request's vectors, one after another (n_inputs of them, each of
--   cardinality(vectors) / n_inputs values). The serving process sends them in PostgreSQL's binary array format
--   (pgml._requests_answer), so no value is printed as text nor parsed again on the way in, and pgml.embed
--   cuts them into its rows (the slices of a flat float4 array: no JSON parsed, no literal cast). The answer of
--   1,000 vectors of 384 dimensions was a 5.8 MB JSON document of real[] literals: its jsonb parse and pglz
--   compression at the answer, and the 384,000 float4in calls at the caller, cost about a quarter of the time the
--   model's forward pass took.
-- * STORAGE EXTERNAL: out of line when large, never compressed (float32 values do not compress; pglz would try).
-- * Other readers of an answer (pgml._request_answer: the Python client, and callers in a repeatable-read
--   transaction) get the vectors as the JSON array of real[] literals they got before (sql/functions).

-- * pgml._requests_answer takes the vectors (counts, dim, flat: DEFAULT NULL) as its last parameters: a new
--   signature, so the old one is dropped here (body and grants in sql/functions); the serving process of the
--   previous version, calling it with three arguments, still answers.

DROP FUNCTION IF EXISTS pgml._requests_answer(text, bigint[], jsonb[]);

ALTER TABLE pgml.requests ADD COLUMN IF NOT EXISTS vectors real[];
ALTER TABLE pgml.requests ALTER COLUMN vectors SET STORAGE EXTERNAL;

INSERT INTO pgml.schema_migrations (version) VALUES ('0044_embed_vectors') ON CONFLICT DO NOTHING;
