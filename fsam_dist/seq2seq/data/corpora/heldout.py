"""``builtin:stress`` and ``builtin:spelling``: word tasks on the CMUdict words the pretrained miniature never saw.

Both use the *held-out* part of the pretraining corpus (:mod:`fsam_dist.seq2seq.pretrain`):

* train = the first ``RESERVED_WORDS`` words of the ``builtin:cmudict`` train split (the pool the
  pretraining leaves out), validation and test = the cmudict validation and test words (never in
  pretraining). The cmudict split is always its seed-0 split, the one the pretraining uses.
* Only words of 4 or more letters a–z, and none that occurs (case-folded) as a word in the
  pretraining's Django texts (the English strings and German translations of the
  ``builtin:django-de`` train split), so no word appears anywhere in the pretraining corpus.

**stress** (lexical stress pattern): source = the word's letters separated by spaces
(``"p r o f a n a t i o n"``), target = the stress digit of each syllable of its first CMUdict
pronunciation (``"2 0 1 0"``: 1 primary, 2 secondary, 0 unstressed). Scored by exact match (the
whole pattern right); the majority pattern and a vowel-group heuristic are the baselines.

**spelling** (spelling correction, tried first; it does not learn at this scale, docs/results.md):
source = the word with 1 or 2 synthetic character edits (:func:`misspell`), target = the word,
both letters separated by spaces. Edits: 1 for half the words, 2 for the other half; each a
substitution (another letter), a deletion (words keep at least 3 letters), an insertion (a random
letter) or a transposition of two adjacent, different letters, drawn from a generator seeded by a
BLAKE2b hash of ``(seed, word)`` — the same on every machine and Python version. A misspelling
that is the word itself or another dictionary word is redrawn (so the source never is a correct
word); a word with no such misspelling in 50 draws is left out. ``seed`` changes the edits, not
the split. Copying the input scores 0 % exact match by construction.
"""

from __future__ import annotations

import functools
import random
import re

from ..report import DataReport
from . import hash_unit

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LETTERS = 4
_WORD = re.compile(r"^[a-z]+$")
OPS = ("substitute", "delete", "insert", "transpose")


def edit(letters: list[str], op: str, rng: random.Random) -> list[str] | None:
    """``letters`` after one edit ``op`` at a random position, or None when ``op`` does not apply
    (a deletion below 3 letters, a transposition with no two adjacent different letters)."""
    out = list(letters)
    if op == "substitute":
        i = rng.randrange(len(out))
        out[i] = rng.choice([c for c in LETTERS if c != out[i]])
    elif op == "delete":
        if len(out) <= 3:
            return None
        del out[rng.randrange(len(out))]
    elif op == "insert":
        out.insert(rng.randrange(len(out) + 1), rng.choice(LETTERS))
    elif op == "transpose":
        places = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
        if not places:
            return None
        i = rng.choice(places)
        out[i], out[i + 1] = out[i + 1], out[i]
    else:
        raise ValueError(f"unknown edit {op!r}: use one of {OPS}")
    return out


def misspell(word: str, seed: int, known: frozenset | set = frozenset(), tries: int = 50) -> str | None:
    """``word`` with 1 or 2 random edits (deterministic given ``seed`` and ``word``), never equal to
    ``word`` nor to a word in ``known``; None when ``tries`` draws all failed."""
    rng = random.Random(int(hash_unit(seed, "spelling\x00" + word) * 2 ** 53))
    n_edits = 1 if rng.random() < 0.5 else 2
    for _ in range(tries):
        letters = list(word)
        for _ in range(n_edits):
            letters = edit(letters, rng.choice(OPS), rng) or letters
        noisy = "".join(letters)
        if noisy != word and noisy not in known:
            return noisy
    return None


@functools.lru_cache(maxsize=1)
def pretraining_vocabulary() -> frozenset:
    """Every word (``\\w+``, case-folded) of the pretraining's Django texts."""
    from .. import load_examples

    django, _ = load_examples("builtin:django-de", "train")
    return frozenset(w.lower() for ex in django for w in re.findall(r"\w+", ex["source"] + " " + ex["target"]))


@functools.lru_cache(maxsize=1)
def dictionary_words() -> frozenset:
    """Every cmudict word (all splits): a misspelling must not be one of them."""
    from .. import load_examples

    return frozenset(ex["source"].replace(" ", "") for split in ("train", "validation", "test")
                     for ex in load_examples("builtin:cmudict", split)[0])


def held_out_examples(split: str) -> tuple[list[dict], dict]:
    """The cmudict examples (``source`` spaced letters, ``target`` pronunciation) of the held-out
    words of ``split`` and counts of what was left out."""
    from ...pretrain import RESERVED_WORDS
    from .. import load_examples

    examples, _ = load_examples("builtin:cmudict", split)          # seed 0: the pretraining's split
    if split == "train":
        examples = examples[:RESERVED_WORDS]
    django = pretraining_vocabulary()
    kept, left_out = [], {"not_4_plus_letters_a_z": 0, "in_pretraining_django_texts": 0}
    for ex in examples:
        word = ex["source"].replace(" ", "")
        if not _WORD.match(word) or len(word) < MIN_LETTERS:
            left_out["not_4_plus_letters_a_z"] += 1
        elif word in django:
            left_out["in_pretraining_django_texts"] += 1
        else:
            kept.append(ex)
    return kept, left_out


def stress_pattern(pronunciation: str) -> str:
    """The stress digits of an ARPAbet pronunciation: ``"P R AA2 F AH0 N EY1 SH AH0 N"`` → ``"2 0 1 0"``."""
    return " ".join(p[-1] for p in pronunciation.split() if p[-1].isdigit())


def stress_heuristic(source: str) -> str:
    """A rule-of-thumb baseline: one syllable per group of vowels (``y`` after a consonant counts;
    a final ``e`` after a consonant does not), primary stress on the first: ``"p r o f a n a t i o n"``
    → ``"1 0 0 0"``."""
    word = source.replace(" ", "")
    groups = len(re.findall(r"[aeiou]+|(?<=[^aeiou])y", word))
    if len(word) > 2 and word.endswith("e") and word[-2] not in "aeiouy" and groups > 1:
        groups -= 1
    return " ".join(["1"] + ["0"] * (max(groups, 1) - 1))


def load_stress(split: str, seed: int) -> tuple[list[dict], DataReport]:
    kept, left_out = held_out_examples(split)
    report = DataReport(source="builtin:stress", split=split)
    report.rows = len(kept) + sum(left_out.values())
    examples = [{"id": f"stress:{ex['source'].replace(' ', '')}", "source": ex["source"],
                 "target": stress_pattern(ex["target"])} for ex in kept]
    examples = [ex for ex in examples if ex["target"]]
    report.info.update(words_left_out=left_out, source=_SOURCE, license=_LICENSE)
    return examples, report


_SOURCE = ("cmudict words held out of pretraining (train: the first RESERVED_WORDS of the cmudict train split; "
           "validation/test: cmudict's)")
_LICENSE = "CMU Pronouncing Dictionary data, BSD-2-Clause (Carnegie Mellon University)"


def load(split: str, seed: int) -> tuple[list[dict], DataReport]:
    kept, left_out = held_out_examples(split)
    words = [ex["source"].replace(" ", "") for ex in kept]
    known = dictionary_words()
    report = DataReport(source="builtin:spelling", split=split)
    report.rows = len(words) + sum(left_out.values())
    examples = []
    for word in words:
        noisy = misspell(word, seed, known)
        if noisy is None:
            left_out["no_misspelling_found"] = left_out.get("no_misspelling_found", 0) + 1
            continue
        examples.append({"id": f"spelling:{word}", "source": " ".join(noisy), "target": " ".join(word)})
    report.info.update(words_left_out=left_out, edit_seed=seed, source=_SOURCE, license=_LICENSE)
    return examples, report
