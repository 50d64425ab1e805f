"""The pretraining objectives (T5 span corruption, BART text infilling) and the pretrained miniature."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsam_dist.seq2seq.pretrain import (INFO_FILE, Denoiser, prefix_length, prefix_mask, pretrain, random_span_mask,
                                        span_corruption, text_infilling)

TEXTS = [f"{w} is a small {c} word" for w in ("cat", "dog", "bird", "fish", "frog", "mouse", "horse", "cow")
         for c in ("red", "green", "blue", "yellow")] * 4


def test_span_corruption_on_a_hand_made_example():
    ids = [10, 11, 12, 13, 14]
    mask = np.array([False, True, False, True, True])
    source, target = span_corruption(ids, mask, sentinels=[99, 98, 97], eos=1)
    assert source == [10, 99, 12, 98, 1]
    assert target == [99, 11, 98, 13, 14, 1]


def test_span_corruption_needs_enough_sentinels():
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption([1, 2, 3, 4, 5], np.array([True, False, True, False, True]), sentinels=[9, 8], eos=1)


def test_text_infilling_on_a_hand_made_example():
    ids = [10, 11, 12, 13, 14]
    mask = np.array([False, True, False, True, True])
    source, target = text_infilling(ids, mask, mask_id=4, bos=0, eos=2)
    assert source == [0, 10, 4, 12, 4, 2]
    assert target == [0, 10, 11, 12, 13, 14, 2]


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word (ids from 10), sentinels 90…, EOS 1."""

    eos_token_id = 1

    def __init__(self):
        self.ids = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.split()]}

    def get_vocab(self):
        return {f"<extra_id_{i}>": 90 + i for i in range(3)}

    def convert_tokens_to_ids(self, tokens):
        return [self.get_vocab()[t] for t in tokens]


def test_prefix_lm_hides_a_dictionary_lines_pronunciation():
    tok = WordTokenizer()
    line = "c a t : K AE1 T"
    ids = tok(line)["input_ids"]                                   # c a t : K AE1 T -> 10 … 16
    assert prefix_length(line, ids, tok) == 4                       # "c a t :" is the prefix
    assert prefix_length("no separator here", tok("no separator here")["input_ids"], tok) == 0
    assert prefix_mask(7, 4, np.random.default_rng(0)).tolist() == [False] * 4 + [True] * 3
    denoise = Denoiser("t5", tok, seed=0, prefix_lm=1.0)
    assert denoise(ids, cut=4) == {"input_ids": [10, 11, 12, 13, 90, 1], "labels": [90, 14, 15, 16, 1]}
    random_cut = prefix_mask(7, 0, np.random.default_rng(0))       # no cut given: a random suffix, never all
    assert 1 <= random_cut.sum() <= 6 and random_cut[-1] and random_cut.tolist() == sorted(random_cut.tolist())
    plain = Denoiser("t5", tok, seed=0, prefix_lm=0.0)(ids, cut=4)  # span corruption: 15 % of 7 tokens, one span
    assert plain["input_ids"].count(90) == 1 and len(plain["labels"]) == 3


def test_random_span_mask_counts_and_is_seeded():
    for length in (2, 3, 10, 37, 100):
        mask = random_span_mask(length, np.random.default_rng(0), density=0.15, mean_span=3.0)
        noise = min(max(1, round(length * 0.15)), length - 1)
        assert mask.sum() == noise and not mask.all()
        spans = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
        assert (spans == 1).sum() == max(1, min(round(noise / 3), noise, length - noise))
    a = random_span_mask(50, np.random.default_rng(3), 0.3)
    b = random_span_mask(50, np.random.default_rng(3), 0.3)
    assert (a == b).all()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_pretraining_lowers_the_loss_and_saves_a_model_that_generates(tmp_path, arch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / arch
    pretrain(out, arch, texts=TEXTS, progress=False, vocab_size=120, d_model=32, layers=1, heads=2, d_ff=64,
             dropout=0.0, extra_ids=8, steps=60, batch_size=16, lr=5e-3, warmup=5)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["loss_last_50"] < 0.8 * info["loss_first_50"], info
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["cat is a small red word"], return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=5)
    assert generated.shape[0] == 1 and generated.shape[1] >= 2
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


def test_a_cached_model_is_reused_and_other_settings_refused(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / INFO_FILE).write_text(json.dumps({"arch": "t5", "steps": 1}))
    with pytest.raises(ValueError, match="other settings"):
        pretrain(out, "t5", progress=False)
    other = tmp_path / "user-files"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a pretrained model directory"):
        pretrain(other, "t5", progress=False)
    assert (other / "mine.txt").read_text() == "keep"
