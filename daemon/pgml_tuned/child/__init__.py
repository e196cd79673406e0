"""A job's child process: `python -m pgml_tuned.child` (entry in __main__.py).

context.py  JobContext, all a recipe sees of the outside world
store.py    the child's connection and every read / fenced write it makes
events.py   the JSON-lines channel to the worker
"""
