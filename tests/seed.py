"""The seed document's SQL, taken verbatim from tests/data/fine-tuning-guide.md (a copy of
../shared/seed/fine-tuning-guide.md; test_seed_copy_is_current checks they agree when both exist)."""

from __future__ import annotations

import re
from pathlib import Path

GUIDE = Path(__file__).parent / "data" / "fine-tuning-guide.md"
SHARED_GUIDE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "fine-tuning-guide.md"


def blocks() -> list[str]:
    return re.findall(r"```(?:postgresql|bash)\n(.*?)```", GUIDE.read_text(), re.S)


def statements(block: str) -> list[str]:
    """The SQL statements of a block, without psql prompts and the output tables shown after them."""
    text = block.replace("pgml=# ", "").replace("pgml: ", "")
    out, current = [], []
    for line in text.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(current).strip())
            current = []
    return [s for s in out if s and not s.lstrip().startswith(("(", "-"))] or [s for s in out if s]


def find(start: str, nth: int = 0) -> str:
    """The nth statement of the guide that starts with `start` (after comments)."""
    found = []
    for b in blocks():
        for s in statements(b):
            body = "\n".join(line for line in s.splitlines() if not line.strip().startswith("--")).strip()
            if body.startswith(start):
                found.append(body)
    return found[nth]


IMDB_SHUFFLED_VIEW = "CREATE VIEW pgml.imdb_shuffled_view AS"
IMDB_TRAIN_VIEW = "CREATE VIEW pgml.imdb_train_view AS"
IMDB_TEST_VIEW = "CREATE VIEW pgml.imdb_test_view AS"
TUNE_IMDB = "SELECT pgml.tune(\n    'imdb_review_sentiment'"
TUNE_RESTART = "SELECT pgml.tune(\n    'imdb_review_sentiement'"
FINGPT_SHUFFLED_VIEW = "CREATE VIEW pgml.fingpt_sentiment_shuffled_view AS"
FINGPT_TRAIN_VIEW = "CREATE VIEW pgml.fingpt_sentiment_train_view AS"
TUNE_FINGPT_9 = "SELECT pgml.tune(\n    'fingpt_sentiement'"
TUNE_LLAMA = "SELECT pgml.tune(\n    'fingpt-llama2-7b-chat'"


def job_id(tune_result: object) -> int:
    """The job id from `SELECT pgml.tune(...)`'s composite result, e.g. '(7,queued,1,7)'."""
    if isinstance(tune_result, tuple):
        return int(tune_result[0])
    return int(str(tune_result).strip("()").split(",")[0])
