#!/usr/bin/env python3
"""Generate ``daemon/pgml_tuned/data/reviews.csv``: a labeled movie-review sentiment set for demos and tests.

The reviews are synthetic. They are built from varied templates so that a small model can learn them, but
no single word gives the label away: positive reviews use negated negative words ("never dull") and concede
small faults, negative reviews use negated positive words ("not funny at all") and grant small merits, and
both share neutral sentences about when and where the film was seen.

Deterministic: the same seed always writes the same file. Run from anywhere::

    python scripts/make_reviews.py            # writes the bundled file
    python scripts/make_reviews.py --check    # exits 1 if the bundled file is out of date
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from pathlib import Path

SEED = 20240611
PER_CLASS = 200
OUT = Path(__file__).resolve().parents[1] / "daemon" / "pgml_tuned" / "data" / "reviews.csv"

SUBJECTS = [
    "the film",
    "this movie",
    "the sequel",
    "the director's latest",
    "this thriller",
    "the comedy",
    "this documentary",
    "the animated feature",
    "the remake",
    "this drama",
    "the horror flick",
    "the musical",
    "this biopic",
    "the western",
    "this romance",
    "the war epic",
    "the heist picture",
    "this mystery",
    "the family adventure",
    "the science fiction story",
]

ASPECTS = [
    "acting",
    "script",
    "soundtrack",
    "cinematography",
    "pacing",
    "dialogue",
    "ending",
    "plot",
    "lead performance",
    "effects work",
    "direction",
    "editing",
    "supporting cast",
    "score",
    "screenplay",
    "set design",
    "humor",
    "villain",
    "camera work",
    "final act",
]

POS_ADJ = [
    "wonderful",
    "brilliant",
    "gripping",
    "charming",
    "moving",
    "hilarious",
    "stunning",
    "delightful",
    "superb",
    "heartfelt",
    "clever",
    "beautiful",
    "thoughtful",
    "excellent",
    "memorable",
    "engaging",
    "touching",
    "fantastic",
    "impressive",
    "powerful",
    "fresh",
    "witty",
]

NEG_ADJ = [
    "dull",
    "boring",
    "tedious",
    "clumsy",
    "predictable",
    "awful",
    "forgettable",
    "bland",
    "messy",
    "lifeless",
    "disappointing",
    "shallow",
    "painful",
    "confusing",
    "terrible",
    "weak",
    "sloppy",
    "flat",
    "pointless",
    "tiresome",
    "stale",
    "clunky",
]

# Words that only soften or strengthen; shared by both classes.
ADVERBS = [
    "really",
    "truly",
    "quite",
    "genuinely",
    "remarkably",
    "surprisingly",
    "simply",
    "utterly",
    "rather",
]

# Small merits a negative review may grant, and small faults a positive review may concede.
MILD_POS = ["fine", "decent", "solid", "competent", "not bad", "pleasant enough", "perfectly adequate"]
MILD_NEG = ["uneven", "not perfect", "a little rough", "hit and miss", "far from flawless", "a bit much"]

NEUTRAL = [
    "I saw it with my family on a rainy Sunday.",
    "It runs a little over two hours.",
    "My friend dragged me along to see it.",
    "It is based on a novel I have not read.",
    "The theater was almost empty.",
    "I watched it on a long flight.",
    "I went in knowing nothing about it.",
    "We caught the late show on a Friday.",
    "I streamed it at home last weekend.",
    "It opened in theaters last month.",
    "My sister recommended it to me.",
    "I had read a few reviews beforehand.",
    "The trailer had been everywhere for weeks.",
    "It is the second film from this director.",
    "I watched it twice to be sure.",
    "The popcorn was stale, but that is hardly the film's fault.",
]

POS_CLOSERS = [
    "I would happily watch it again.",
    "Easily one of the best films I have seen this year.",
    "Highly recommended.",
    "I left the theater smiling.",
    "Not a single dull moment.",
    "I cannot wait to see it again.",
    "It deserves every award it gets.",
    "Go see it on the biggest screen you can find.",
    "It stayed with me for days.",
    "I was hooked from the opening scene.",
    "Worth every penny.",
    "The audience applauded at the end.",
    "I would not change a thing.",
    "It never loses its grip.",
    "I have already told all my friends about it.",
]

NEG_CLOSERS = [
    "I would not watch it again.",
    "I wanted my money back.",
    "I checked my watch more than once.",
    "Save your money.",
    "I nearly fell asleep halfway through.",
    "Half the audience walked out early.",
    "I cannot recommend it to anyone.",
    "Skip it and read the book instead.",
    "I forgot about it by the next morning.",
    "It never finds its footing.",
    "What a waste of a talented cast.",
    "Two hours of my life I will never get back.",
    "I kept waiting for it to get better, and it never did.",
    "Not worth the ticket price.",
    "I regret not leaving at the intermission.",
]


def _a(word: str) -> str:
    """The indefinite article for ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _pos_core(rng: random.Random, s: str) -> str:
    a, a2 = rng.sample(ASPECTS, 2)
    p, p2 = rng.sample(POS_ADJ, 2)
    n = rng.choice(NEG_ADJ)
    adv = rng.choice(ADVERBS)
    templates = [
        f"{s} is {adv} {p}.",
        f"I found {s} {p} from start to finish.",
        f"the {a} is {p}, and the {a2} is just as {p2}.",
        f"{s} was not {n} at all; in fact it was {p}.",
        f"I expected {s} to be {n}, but it turned out to be {p}.",
        f"despite {_a(n)} {n} first act, {s} ends up {adv} {p}.",
        f"the {a} could have been tighter, but overall {s} is {p}.",
        f"what {_a(p)} {p} surprise {s} turned out to be.",
        f"I loved the {a} in {s}; it is {p}.",
        f"{s} never feels {n}, thanks to the {p} {a}.",
        f"some critics called {s} {n}, but I thought it was {p}.",
        f"the {a} is {rng.choice(MILD_NEG)}, yet {s} is still {adv} {p}.",
        f"the {a} alone makes {s} worth seeing.",
        f"I did not expect to enjoy {s} this much.",
        f"{s} is {p} and {p2}, and the {a} really works.",
    ]
    return _cap(rng.choice(templates))


def _neg_core(rng: random.Random, s: str) -> str:
    a, a2 = rng.sample(ASPECTS, 2)
    n, n2 = rng.sample(NEG_ADJ, 2)
    p = rng.choice(POS_ADJ)
    adv = rng.choice(ADVERBS)
    templates = [
        f"{s} is {adv} {n}.",
        f"I found {s} {n} from start to finish.",
        f"the {a} is {n}, and the {a2} is even worse.",
        f"{s} is not {p} at all.",
        f"{s} was nowhere near as {p} as the trailer promised.",
        f"I expected {s} to be {p}, but it turned out to be {n}.",
        f"despite the {p} {a}, {s} ends up {adv} {n}.",
        f"the {a} was {rng.choice(MILD_POS)}, but nothing else in {s} worked.",
        f"what {_a(n)} {n} mess {s} turned out to be.",
        f"I hated the {a} in {s}; it is {n}.",
        f"{s} never feels {p}, thanks to the {n} {a}.",
        f"some critics called {s} {p}, but I thought it was {n}.",
        f"the {a} is {rng.choice(MILD_POS)}, yet {s} is still {adv} {n}.",
        f"not even the {a} can save {s}.",
        f"{s} is {n} and {n2}, and the {a} never works.",
    ]
    return _cap(rng.choice(templates))


def _review(rng: random.Random, positive: bool) -> str:
    core = _pos_core if positive else _neg_core
    subject = rng.choice(SUBJECTS)
    sentences = [core(rng, subject)]
    extra = rng.random()
    if extra < 0.45:
        sentences.append(rng.choice(POS_CLOSERS if positive else NEG_CLOSERS))
    elif extra < 0.7:
        second = core(rng, subject)
        if second != sentences[0]:
            sentences.append(second)
    if rng.random() < 0.35:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(NEUTRAL))
    return " ".join(sentences[:3])


def generate(seed: int = SEED, per_class: int = PER_CLASS) -> list[tuple[str, str]]:
    """``per_class`` unique reviews of each class, shuffled with ``seed``."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for label in ("negative", "positive"):
        count = 0
        while count < per_class:
            text = _review(rng, positive=label == "positive")
            if text in seen:
                continue
            seen.add(text)
            rows.append((text, label))
            count += 1
    rng.shuffle(rows)
    return rows


def render(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "class"])
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
