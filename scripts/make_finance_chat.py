#!/usr/bin/env python3
"""Generate ``daemon/pgml_tuned/data/finance_chat.csv``: instruction/input/output rows for chat demos.

Shaped like the FinGPT sentiment instruction sets: a fixed instruction, a one-sentence financial news item as
input, and ``negative``/``neutral``/``positive`` as output. Companies, people and figures are invented.

Deterministic: the same seed always writes the same file::

    python scripts/make_finance_chat.py            # writes the bundled file
    python scripts/make_finance_chat.py --check    # exits 1 if the bundled file is out of date
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from pathlib import Path

SEED = 20240612
PER_CLASS = 50
OUT = Path(__file__).resolve().parents[1] / "daemon" / "pgml_tuned" / "data" / "finance_chat.csv"
INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."

COMPANIES = [
    "Nordvik Energy",
    "Alderbank",
    "Castellan Foods",
    "Helix Semiconductors",
    "Bluewater Shipping",
    "Marlow Retail Group",
    "Quintera Pharma",
    "Solvane Airlines",
    "Tessaro Motors",
    "Oakridge Insurance",
    "Pinecrest Telecom",
    "Veltris Software",
    "Granmoor Mining",
    "Lumen Harbor Utilities",
    "Redfern Logistics",
    "Kestrel Biotech",
]
QUARTERS = ["first-quarter", "second-quarter", "third-quarter", "fourth-quarter", "full-year"]
UNITS = ["plant", "factory", "distribution centre", "data centre", "office", "store"]
CITIES = ["Rotterdam", "Lyon", "Austin", "Osaka", "Gdansk", "Porto", "Leeds", "Monterrey", "Tampere", "Perth"]
PEOPLE = ["Anna Lindqvist", "Marco Bellini", "Priya Raman", "Tomasz Nowak", "Helen Park", "David Okafor"]
ROLES = ["chief financial officer", "chief operating officer", "head of investor relations", "board chair"]
MONTHS = ["January", "February", "March", "April", "May", "June", "September", "October", "November"]


def _pct(rng: random.Random, lo: float, hi: float) -> str:
    return f"{rng.uniform(lo, hi):.1f}"


def _eur(rng: random.Random, lo: int, hi: int) -> str:
    return f"EUR {rng.randint(lo, hi)} million"


def _positive(rng: random.Random) -> str:
    c, c2 = rng.sample(COMPANIES, 2)
    q = rng.choice(QUARTERS)
    templates = [
        f"{c} shares rose {_pct(rng, 2, 14)}% after the company raised its {q} profit forecast.",
        f"{c} reported {q} net profit up {_pct(rng, 5, 40)}% from a year earlier, beating analyst estimates.",
        f"{c} won a EUR {rng.randint(20, 900)} million contract to supply {rng.choice(CITIES)}.",
        f"{c} will increase its dividend by {_pct(rng, 3, 15)}% after record {q} sales.",
        f"Operating profit at {c} climbed to {_eur(rng, 5, 300)} from {_eur(rng, 1, 4)}.",
        f"{c} said orders grew strongly in {rng.choice(MONTHS)}, and it expects margins to improve.",
        f"Analysts upgraded {c} to buy, citing strong demand and lower costs.",
        f"{c} agreed to buy {c2} at a premium, and both stocks gained in early trading.",
        f"{c} cut its net debt by half and regained an investment-grade rating.",
        f"Net sales at {c} increased {_pct(rng, 4, 25)}% to EUR {rng.randint(50, 900)} million.",
    ]
    return rng.choice(templates)


def _negative(rng: random.Random) -> str:
    c = rng.choice(COMPANIES)
    q = rng.choice(QUARTERS)
    pick = rng.choice
    templates = [
        f"{c} shares fell {_pct(rng, 2, 18)}% after the company issued a {q} profit warning.",
        f"{c} reported a {q} operating loss of EUR {rng.randint(3, 200)} million, wider than expected.",
        f"{c} will cut {rng.randint(40, 1200)} jobs and close its {pick(UNITS)} in {pick(CITIES)}.",
        f"Net sales at {c} decreased {_pct(rng, 3, 30)}% as demand weakened.",
        f"{c} suspended its dividend after {q} earnings missed forecasts.",
        f"Regulators fined {c} EUR {rng.randint(2, 90)} million over reporting failures.",
        f"Analysts downgraded {c} to sell, warning that margins will keep shrinking.",
        f"{c} lowered its {q} outlook, citing higher costs and falling orders.",
        f"Operating profit at {c} dropped to {_eur(rng, 1, 20)} from {_eur(rng, 25, 120)}.",
        f"{c} lost a major customer in {rng.choice(CITIES)}, and its stock slid in heavy trading.",
    ]
    return rng.choice(templates)


def _neutral(rng: random.Random) -> str:
    c = rng.choice(COMPANIES)
    templates = [
        f"{c} will publish its {rng.choice(QUARTERS)} results on {rng.randint(2, 28)} {rng.choice(MONTHS)}.",
        f"{c} appointed {rng.choice(PEOPLE)} as {rng.choice(ROLES)}, effective next month.",
        f"{c} will hold its annual general meeting in {rng.choice(CITIES)} in {rng.choice(MONTHS)}.",
        f"{c} said its {rng.choice(UNITS)} in {rng.choice(CITIES)} will be renamed as part of a rebranding.",
        f"{c} has {rng.randint(200, 9000)} employees and operates in {rng.randint(3, 40)} countries.",
        f"The board of {c} proposes that the dividend remain unchanged at EUR {rng.randint(1, 9)}0 cents.",
        f"{c} reported {rng.choice(QUARTERS)} sales in line with its earlier guidance.",
        f"{c} moved its headquarters within {rng.choice(CITIES)} to a new office building.",
        f"{c} is listed on the stock exchange and its shares are part of the main index.",
        f"The contract between {c} and the city of {rng.choice(CITIES)} runs until the end of next year.",
    ]
    return rng.choice(templates)


def generate(seed: int = SEED, per_class: int = PER_CLASS) -> list[tuple[str, str, str]]:
    """``per_class`` unique rows of each sentiment, shuffled with ``seed``."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for label, make in (("negative", _negative), ("neutral", _neutral), ("positive", _positive)):
        count = 0
        while count < per_class:
            news = make(rng)
            if news in seen:
                continue
            seen.add(news)
            rows.append((INSTRUCTION, news, label))
            count += 1
    rng.shuffle(rows)
    return rows


def render(rows: list[tuple[str, str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["instruction", "input", "output"])
    writer.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is out of date")
    args = parser.parse_args(argv)
    text = render(generate())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
