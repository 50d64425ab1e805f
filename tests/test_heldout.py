"""builtin:stress and builtin:spelling: targets and edits on hand-made examples, determinism, and splits disjoint from each other and from the pretraining corpus."""

from __future__ import annotations

import re

import pytest

from fsam_dist.seq2seq.data.corpora.heldout import edit, misspell, stress_heuristic, stress_pattern
from fsam_dist.seq2seq.metrics import edit_distance


def test_stress_pattern_and_its_heuristic_baseline_on_hand_made_examples():
    assert stress_pattern("P R AA2 F AH0 N EY1 SH AH0 N") == "2 0 1 0"
    assert stress_pattern("HH AH0 L OW1") == "0 1"
    assert stress_pattern("B R AE1 N F ER0 D") == "1 0"
    assert stress_heuristic("p r o f a n a t i o n") == "1 0 0 0"       # pro-fa-na-tion: 4 vowel groups
    assert stress_heuristic("g l o r e") == "1"                         # final silent e
    assert stress_heuristic("f u n n y") == "1 0"                       # y after a consonant
    assert stress_heuristic("r h y t h m") == "1"                       # at least one syllable


class Scripted:
    """A stand-in random generator: randrange and choice return scripted positions/items."""

    def __init__(self, positions, letters=None):
        self.positions, self.letters = list(positions), list(letters or [])

    def randrange(self, n):
        i = self.positions.pop(0)
        assert 0 <= i < n
        return i

    def choice(self, seq):
        if self.letters and isinstance(seq[0], str) and len(seq[0]) == 1 and seq[0].isalpha() and len(seq) >= 25:
            letter = self.letters.pop(0)
            assert letter in seq
            return letter
        return seq[self.positions.pop(0)]


def test_each_edit_on_a_hand_made_example():
    word = list("word")
    assert "".join(edit(word, "substitute", Scripted([1], ["a"]))) == "ward"
    with pytest.raises(AssertionError):                       # a substitution never keeps the letter
        edit(word, "substitute", Scripted([1], ["o"]))
    assert "".join(edit(word, "delete", Scripted([0]))) == "ord"
    assert edit(list("cat"), "delete", Scripted([0])) is None   # words keep at least 3 letters
    assert "".join(edit(word, "insert", Scripted([4], ["s"]))) == "words"
    # transposition only swaps adjacent *different* letters: in "woord" the places are 0, 2, 3
    assert "".join(edit(list("woord"), "transpose", Scripted([1]))) == "worod"
    assert edit(list("aaaa"), "transpose", Scripted([])) is None
    assert word == list("word")                                # the input is not changed in place
    with pytest.raises(ValueError, match="unknown edit"):
        edit(word, "swap", Scripted([]))


WORDS = ["spelling", "correction", "miniature", "sharpness", "aware", "fisher", "mask", "interval", "gradient",
         "parameter", "optimizer", "learning", "budget", "validation", "pronounce"]


def test_misspellings_are_deterministic_one_or_two_edits_and_never_a_known_word():
    first = [misspell(w, 0) for w in WORDS]
    assert first == [misspell(w, 0) for w in WORDS]            # same seed, same edits
    assert first != [misspell(w, 1) for w in WORDS]            # the seed changes them
    for word, noisy in zip(WORDS, first):
        assert noisy != word and set(noisy) <= set("abcdefghijklmnopqrstuvwxyz")
        assert abs(len(noisy) - len(word)) <= 2
        assert 1 <= edit_distance(list(noisy), list(word)) <= 4   # 2 edits, a transposition costs 2 here
    # A misspelling that is a known word is redrawn, deterministically.
    known = {first[0]}
    again = misspell(WORDS[0], 0, known)
    assert again not in known and again != WORDS[0] and again == misspell(WORDS[0], 0, known)


@pytest.mark.parametrize("corpus", ["spelling", "stress"])
def test_builtin_held_out_splits_are_disjoint_and_held_out_of_pretraining(corpus):
    from fsam_dist.seq2seq.data import load_examples, task_for_spec
    from fsam_dist.seq2seq.pretrain import RESERVED_WORDS, corpus_texts

    splits = {s: load_examples(f"builtin:{corpus}", s)[0] for s in ("train", "validation", "test")}
    words = {s: {ex["id"].split(":", 1)[1] for ex in exs} for s, exs in splits.items()}
    assert len(words["train"]) > 9000 and len(words["validation"]) > 2000 and len(words["test"]) > 2000
    assert not (words["train"] & words["validation"]) and not (words["train"] & words["test"])
    assert not (words["validation"] & words["test"])
    # Held out: no target word is anywhere in the pretraining corpus (as a dictionary headword or a Django word).
    seen = set()
    for text in corpus_texts(max_texts=None):
        if " : " in text:
            seen.add(text.split(" : ", 1)[0].replace(" ", ""))
        else:
            seen.update(w.lower() for w in re.findall(r"\w+", text))
    for s in splits:
        assert not (words[s] & seen), s
    reserved = {ex["source"].replace(" ", "") for ex in load_examples("builtin:cmudict", "train")[0][:RESERVED_WORDS]}
    assert words["train"] <= reserved
    assert task_for_spec(f"builtin:{corpus}") == "gec"
    if corpus == "stress":
        ex = next(e for e in splits["validation"] if e["id"] == "stress:profanation")
        assert (ex["source"], ex["target"]) == ("p r o f a n a t i o n", "2 0 1 0")
        return
    # Spelling: the target is the word; every source differs from it; the seed changes the edits, not the words.
    assert all(ex["target"].replace(" ", "") == ex["id"].split(":", 1)[1] for ex in splits["train"])
    assert all(ex["source"] != ex["target"] for exs in splits.values() for ex in exs)
    other, _ = load_examples("builtin:spelling", "validation", seed=1)
    assert [ex["target"] for ex in other] == [ex["target"] for ex in splits["validation"]]
    assert [ex["source"] for ex in other] != [ex["source"] for ex in splits["validation"]]
