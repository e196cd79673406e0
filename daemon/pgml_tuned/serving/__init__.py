"""The inference lane: a serving process beside the training children (`python -m pgml_tuned.serving`, started and
restarted by the daemon, worker/serving.py). It claims batches of pgml.requests, keeps models warm (an LRU cache
bounded by --model-cache-mb), runs concurrent requests for one model as one batch, and answers in the shapes of
the guide: text-classification `[{"label": ..., "score": ...}]`, generation / chat with real token usage and,
when asked, streamed chunks.

- requests.py   the rows: claim, renew, answer, fail, stream, release (the SQL of 0014_serving.sql)
- cache.py      model names → cache keys → loaded models (models.py resolves and loads; files from pgml.files)
- inference.py  classify / generate over a loaded model (pure torch + transformers, no database)
- server.py     the process's loop: LISTEN, claim, group, run, answer; leases and housekeeping
"""
