"""`pgml-tuned dashboard`: a small read-only web page over the SQL views — jobs and their progress, live loss /
eval curves, two models side by side, a model's files and metrics.

It reads with the login of the DSN it is given (the viewer's own, like every command), in read-only sessions,
so the database decides what it shows exactly as it does in psql. Needs the `dashboard` extra (starlette,
uvicorn); the page is static files of this package with a vendored chart library (uPlot), no build step.
"""
