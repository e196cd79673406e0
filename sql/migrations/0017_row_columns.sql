-- 0017_row_columns: the rows a job copies at submit time go into columns of their own (c1 .. c8, text) instead of one
-- text[] per row. Building an array per row made pgml.tune's copy of 25,000 IMDB-sized rows take 2.5x as long as a
-- plain INSERT ... SELECT of them (bench/submit.py: the array shape 239 ms, columns 121 ms, plain 122 ms); the
-- reader (pgml._child_rows) builds the arrays instead, once per job, where nobody waits on it.

ALTER TABLE pgml.job_rows ADD COLUMN IF NOT EXISTS c1 text, ADD COLUMN IF NOT EXISTS c2 text,
    ADD COLUMN IF NOT EXISTS c3 text, ADD COLUMN IF NOT EXISTS c4 text, ADD COLUMN IF NOT EXISTS c5 text,
    ADD COLUMN IF NOT EXISTS c6 text, ADD COLUMN IF NOT EXISTS c7 text, ADD COLUMN IF NOT EXISTS c8 text;
-- A BRIN index instead of a btree on job_id: a job's rows go in by one statement, so they lie together, and a BRIN
-- costs next to nothing to keep up per row (the btree was a third of the copy's time: 185 vs 156 ms for 25,000 rows,
-- 112 without any index). Rows of pages not yet summarized are always read, which only widens a read, never misses.
DROP INDEX IF EXISTS pgml.job_rows_job_idx;
CREATE INDEX IF NOT EXISTS job_rows_job_brin ON pgml.job_rows USING brin (job_id)
    WITH (pages_per_range = 16, autosummarize = on);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'pgml.job_rows'::regclass AND attname = 'v'
               AND NOT attisdropped) THEN
        UPDATE pgml.job_rows SET c1 = v[1], c2 = v[2], c3 = v[3], c4 = v[4], c5 = v[5], c6 = v[6], c7 = v[7], c8 = v[8];
        ALTER TABLE pgml.job_rows DROP COLUMN v;
    END IF;
END $$;

INSERT INTO pgml.schema_migrations (version) VALUES ('0017_row_columns') ON CONFLICT DO NOTHING;
