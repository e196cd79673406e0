"""pgml.tune(task => 'text-embedding' | 'text-ranking') refuses bad input at submit, with a HINT, queueing nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.integration.test_tune_validation import assert_rejected, tune


@pytest.fixture
def pairs(conn: psycopg.Connection[dict[str, Any]]) -> str:
    conn.execute(
        "CREATE TABLE public.pairs (anchor text, positive text, negative text, score real, wide real, n int,"
        " label int, flag boolean)"
    )
    conn.execute(
        "INSERT INTO public.pairs SELECT 'a' || (i % 3), 'p' || i, 'n' || i, i / 10.0, i, i, i % 2, i % 2 = 0"
        " FROM generate_series(1, 8) i"
    )
    conn.execute("CREATE VIEW public.one_anchor AS SELECT 'same'::text AS anchor, positive FROM public.pairs")
    conn.execute(
        "CREATE VIEW public.some_null AS SELECT CASE WHEN n = 3 THEN NULL ELSE anchor END AS anchor, positive,"
        " label FROM public.pairs"
    )
    return "public.pairs"


EMB = {"task": "text-embedding", "relation_name": "public.pairs"}
RANK = {"task": "text-ranking", "relation_name": "public.pairs"}


def hp(**dargs: Any) -> dict[str, Any]:
    return {"hyperparams": {"dataset_args": dargs}}


@pytest.mark.parametrize(
    ("kw", "message", "hint"),
    [
        (
            {**EMB, **hp(positive_column="nope")},
            "column 'nope' (dataset_args.positive_column) does not exist",
            "columns of",
        ),
        ({**EMB, **hp(positive_column="n")}, "has type integer, but it must hold text", "cast it in a view"),
        ({**EMB, **hp(score_column="anchor")}, "has type text, but it must hold numbers", "scores are numbers"),
        (
            {**EMB, **hp(negative_column="negative", score_column="score")},
            "gives both negative_column and score_column",
            "not both",
        ),
        ({**EMB, **hp(matryoshka_dims=[64, 128])}, "smaller than the one before", "decreasing"),
        ({**EMB, **hp(matryoshka_dims=[64, 0])}, "positive whole number", "decreasing"),
        ({**EMB, **hp(matryoshka_dims=[64.5])}, "positive whole number", "decreasing"),
        ({**EMB, **hp(matryoshka_dims=64)}, "must be a JSON array", "e.g."),
        ({**EMB, **hp(score_column="wide")}, "has values from 1 to 8, outside [-1, 1]", "rescale them"),
        ({**EMB, "relation_name": "public.one_anchor"}, "has 1 distinct value; at least 2", "several anchors"),
        (
            {**EMB, "relation_name": "public.some_null"},
            "(dataset_args.anchor_column) of public.some_null is NULL in 1",
            "IS NOT NULL",
        ),
        (
            {**RANK, **hp(query_column="anchor", document_column="positive", label_column="n")},
            "has values from 1 to 8, outside [0, 1]",
            "label / 5.0",
        ),
        (
            {**RANK, **hp(query_column="anchor", document_column="positive", label_column="positive")},
            "has type text, but it must hold numbers",
            "number or boolean",
        ),
        (
            {**RANK, "relation_name": "public.one_anchor", **hp(query_column="anchor", document_column="positive")},
            "column 'label' (dataset_args.label_column) does not exist",
            "columns of",
        ),
        (
            {
                **RANK,
                "relation_name": "public.one_anchor",
                **hp(query_column="anchor", document_column="positive", label_column="anchor"),
            },
            "column 'anchor' (dataset_args.label_column) of public.one_anchor has type text",
            "cast it",
        ),
    ],
)
def test_retrieval_submit_refusals(
    conn: psycopg.Connection[dict[str, Any]], pairs: str, kw: dict[str, Any], message: str, hint: str
) -> None:
    assert_rejected(conn, message, hint, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {**EMB, **hp(negative_column="negative", matryoshka_dims=[32, 16])},
        {**EMB, **hp(score_column="score")},
        {**RANK, **hp(query_column="anchor", document_column="positive", label_column="flag")},
        {**RANK, **hp(query_column="anchor", document_column="positive", label_column="label")},
    ],
)
def test_retrieval_submit_accepts(conn: psycopg.Connection[dict[str, Any]], pairs: str, kw: dict[str, Any]) -> None:
    assert tune(conn, **kw)["status"] == "queued"
