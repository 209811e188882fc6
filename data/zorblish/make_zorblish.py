"""A small made-up fine-tuning task: "Translate to Zorblish: <word>" -> <zorblish word>.

Source words are invented (random consonant-vowel syllables, fixed seed) and the translation
follows a fixed rule, so a held-out split measures whether an adapter learnt the rule (and the
answer format), not just memorised pairs:

    zorblish(word) = "zo" + word with vowels rotated (a->o, e->i, i->u, o->a, u->e) + "k"
    e.g.  bantemo -> zobontimak

    python data/zorblish/make_zorblish.py      # (re)writes train.jsonl and val.jsonl here

Records use the chat format (``{"messages": [user, assistant]}``, see server/jobs/data.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261124
N_WORDS = 400
N_VAL = 80
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
ROTATE = str.maketrans("aeiou", "oiuae")
HERE = Path(__file__).resolve().parent


def zorblish(word: str) -> str:
    return "zo" + word.translate(ROTATE) + "k"


def source_words(seed: int = SEED, n: int = N_WORDS) -> list[str]:
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        syllables = rng.choice((2, 2, 3))
        w = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        if rng.random() < 0.3:
            w += rng.choice(CONSONANTS)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def record(word: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Translate to Zorblish: {word}"},
            {"role": "assistant", "content": zorblish(word)},
        ]
    }


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, val) records: the last ``N_VAL`` words are held out."""
    words = source_words(seed)
    return [record(w) for w in words[:-N_VAL]], [record(w) for w in words[-N_VAL:]]


def write(folder: Path = HERE, seed: int = SEED) -> tuple[Path, Path]:
    train, val = build(seed)
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, recs in zip(paths, (train, val), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


if __name__ == "__main__":
    for p in write():
        print(p)
