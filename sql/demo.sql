-- The statements of `pgml-tuned demo` (pgml_tuned/demo.py): what a SQL user runs, as the demo's user.

-- name: demo_table
DROP TABLE IF EXISTS public.pgml_demo_reviews;
CREATE TABLE public.pgml_demo_reviews (id serial PRIMARY KEY, text text NOT NULL, class text);

-- name: demo_copy
COPY public.pgml_demo_reviews (text, class) FROM STDIN;

-- name: demo_rows
SELECT count(*) AS n FROM public.pgml_demo_reviews;

-- name: demo_tune
-- The demo prints this statement as it sends it: the guide's call, with the bundled model and its hyperparams.
SELECT job_id FROM pgml.tune(
    'demo_review_sentiment',
    task => 'text-classification',
    relation_name => 'public.pgml_demo_reviews',
    model_name => %(model)s,
    test_size => 0.2,
    test_sampling => 'stratified',
    hyperparams => %(hyperparams)s::jsonb
);

-- name: demo_job
SELECT * FROM pgml.jobs WHERE id = %(job_id)s;

-- name: demo_losses
SELECT logs->>'epoch' AS epoch, logs->>'step' AS step, logs->>'loss' AS loss FROM pgml.logs
WHERE model_id = %(model_id)s AND jsonb_exists(logs, 'loss') ORDER BY id;

-- name: demo_files
SELECT path, count(*) AS parts, sum(length(data)) AS bytes FROM pgml.files
WHERE model_id = %(model_id)s GROUP BY path ORDER BY path;
