"""The tasks pgml.tune() accepts, in one place for Python.

Each task names its recipe module (pgml_tuned.recipes.<module>, loaded by the child by name, so nothing below
the recipes imports them), the dataset_args columns it reads and the top-level hyperparams keys it accepts.
The same facts live in SQL as the rows of pgml.tasks (sql/migrations), where pgml.tune() checks a request
before anything is queued; tests/unit/test_registry.py checks that the two agree.
Adding a task = a recipe module + an entry here + a row in a migration.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    name: str
    recipe: str  # module under pgml_tuned.recipes
    required_columns: dict[str, str | None]  # dataset_args key -> default column name (None: must be given)
    text_columns: tuple[str, ...]  # dataset_args keys whose columns must hold text
    optional_columns: tuple[str, ...] = ()
    hyperparams: tuple[str, ...] = field(default=("training_args", "dataset_args", "max_seq_length", "resources"))
    admin_only: bool = False  # diagnostic tasks: members of pgml_admin only


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "text-classification",
            "text_classification",
            {"text_column": "text", "class_column": None},
            ("text_column",),
        ),
        Task(
            "text-pair-classification",
            "text_classification",
            {"text1_column": "text1", "text2_column": "text2", "class_column": None},
            ("text1_column", "text2_column"),
        ),
        Task(
            "conversation",
            "conversation.recipe",
            {"user_column": "user", "assistant_column": "assistant"},
            ("user_column", "assistant_column", "system_column"),
            ("system_column",),
            (
                "training_args",
                "dataset_args",
                "lora_config",
                "load_in_8bit",
                "load_in_4bit",
                "max_seq_length",
                "prompt_template",
                "train_on",
                "packing",
                "torch_dtype",
                "attn_implementation",
                "resources",
            ),
        ),
        # retrieval (sentence-transformers): an embedding model from (anchor, positive) pairs, a hard negative or a
        # graded score optional; a reranker (cross-encoder) from (query, document, label) rows
        Task(
            "text-embedding",
            "text_embedding",
            {"anchor_column": "anchor", "positive_column": "positive"},
            ("anchor_column", "positive_column", "negative_column"),
            ("negative_column", "score_column"),
        ),
        Task(
            "text-ranking",
            "text_ranking",
            {"query_column": "query", "document_column": "document", "label_column": "label"},
            ("query_column", "document_column"),
        ),
        # a diagnostic task: a child that sleeps hyperparams.seconds; used to test queues and operations
        Task(
            "noop",
            "noop",
            {},
            (),
            (),
            ("seconds", "steps", "fail", "probe", "expect_token_sha256", "resources", "fail_rank"),
            admin_only=True,
        ),
        # pgml.load_dataset: a Hugging Face dataset (or a worker-side file) into a table pgml."<source>"; queued by
        # pgml.load_dataset_async(), never by pgml.tune()
        Task("load_dataset", "load_dataset", {}, (), (), ("source", "subset", "limit", "kwargs")),
        # pgml.predict_batch: a model's predictions for every row of a relation, into pgml.<output_table>
        Task(
            "predict_batch",
            "predict_batch",
            {"text_column": "text", "key_column": "id"},
            ("text_column",),
            (),
            ("dataset_args", "output_table", "batch_size", "max_length", "resources"),
        ),
        # pgml.embed_batch: a model's vectors for every row of a relation, into pgml.<output_table> (key, embedding)
        Task(
            "embed_batch",
            "embed_batch",
            {"text_column": "text", "key_column": "id"},
            ("text_column",),
            (),
            ("dataset_args", "output_table", "batch_size", "kwargs", "resources"),
        ),
    )
}


def recipe_module(task: str) -> str:
    """The importable module that runs `task`."""
    return f"pgml_tuned.recipes.{TASKS[task].recipe}"
