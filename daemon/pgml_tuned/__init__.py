"""pgml-tuned: fine-tune Hugging Face models from SQL, beside any PostgreSQL.

`pgml_tuned.OpenSourceAI` is PostgresML's client class (pgml_tuned.client), loaded on first use so that
importing the package stays cheap (the package itself is the bottom layer: it imports nothing of its own). The
client's errors (pgml_tuned.PgmlError and its subclasses) and `pgml_tuned.pgml_errors()`, which turns psycopg's
errors into them, are those of pgml_tuned.errors.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
ERRORS = (
    "ConnectionFailedError",
    "InvalidInputError",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "PgmlError",
    "TimedOutError",
    "pgml_errors",
)
__all__ = ["OpenSourceAI", "__version__", *ERRORS]


def __getattr__(name: str) -> Any:
    if name == "OpenSourceAI":
        return importlib.import_module("pgml_tuned.client").OpenSourceAI
    if name in ERRORS:
        return getattr(importlib.import_module("pgml_tuned.errors"), name)
    raise AttributeError(f"module 'pgml_tuned' has no attribute {name!r}")
