"""Build a small, randomly initialised T5 or BART and a tokenizer trained offline on your text.

No pretrained weights can be downloaded here, so tests and demos start from a model made by this
module; a real checkpoint directory (t5-base, flan-t5, bart-large) loads the same way through
:func:`fsam_dist.seq2seq.model.load_model_and_tokenizer`.

Command line::

    python -m fsam_dist.seq2seq.init_model --arch t5 --out runs/t5-tiny --train-file builtin:cmudict
    python -m fsam_dist.seq2seq.init_model --arch bart --out runs/bart-tiny --train-file data/train.jsonl \\
        --vocab-size 1024 --d-model 128 --layers 3 --heads 4 --d-ff 256

Tokenizers (trained in seconds, from the sources and targets together — one shared vocabulary):

* **T5**: a SentencePiece unigram model with T5's ids — ``<pad>`` = 0 (also the decoder start),
  ``</s>`` = 1, ``<unk>`` = 2, no BOS, NFKC normalisation (``nmt_nfkc``, as T5's own), no sentinel
  ``<extra_id_*>`` tokens unless ``extra_ids`` is set. It is wrapped as a transformers
  ``T5Tokenizer`` (``tokenizer.json``) whose segmentation equals SentencePiece's.
* **BART**: a byte-level BPE (``tokenizers``) with ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2,
  ``<unk>`` = 3, ``<mask>`` = 4; every byte is in the alphabet, so the vocabulary has at least
  261 entries whatever ``vocab_size`` says.

The model's vocabulary is exactly the tokenizer's. Everything is deterministic given ``seed``
(single-threaded tokenizer training, ``torch.manual_seed`` before the weights are drawn). Needs
transformers >= 5 (tokenizers built from vocabularies rather than files).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ARCHS = ("t5", "bart")
DEFAULTS = dict(vocab_size=512, d_model=64, layers=2, heads=4, d_ff=128, dropout=0.1, seed=0,
                feed_forward_proj="gated-gelu", max_positions=512, extra_ids=0)
INFO_FILE = "fsam_init.json"


# ---------------------------------------------------------------------------------------- tokenizers
def _precompiled_charsmap(model_proto: bytes) -> bytes | None:
    """The normaliser's precompiled character map of a serialized SentencePiece ``ModelProto``
    (what transformers' T5Tokenizer needs to normalise as SentencePiece does)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    return model.normalizer_spec.precompiled_charsmap or None


def train_t5_tokenizer(texts: list[str], vocab_size: int = 512, extra_ids: int = 0):
    """A ``T5Tokenizer`` from a SentencePiece unigram model trained on ``texts`` (in memory)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no text to train the tokenizer on")
    errors = []
    # Full character coverage where the vocabulary has room; else leave the rarest characters to <unk>.
    for coverage in (1.0, 0.9995, 0.999, 0.995, 0.99):
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
                hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=coverage,
                normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2)
            break
        except RuntimeError as err:  # more distinct characters than the vocabulary has room for
            errors.append(str(err))
    else:
        need = re.search(r"(\d+) vs (\d+)", errors[-1])
        detail = (f"even at 99 % character coverage the text needs {need.group(2)} characters"
                  if need else errors[-1].strip())
        raise ValueError(f"SentencePiece could not build a {vocab_size}-piece vocabulary from this text ({detail}); "
                         f"raise the vocabulary size (--vocab-size)")
    if coverage < 1.0:
        logger.warning("tokenizer: vocabulary %d has no room for every character; character coverage %.4f "
                       "(the rarest characters become <unk>)", vocab_size, coverage)
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids, _spm_precompiled_charsmap=_precompiled_charsmap(proto))


def train_bart_tokenizer(texts: list[str], vocab_size: int = 512):
    """A ``BartTokenizer`` (byte-level BPE) trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no text to train the tokenizer on")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return BartTokenizer(vocab=model["vocab"], merges=merges)


# -------------------------------------------------------------------------------------------- models
def build_model(arch: str, tokenizer, *, d_model: int, layers: int, heads: int, d_ff: int, dropout: float,
                seed: int, feed_forward_proj: str = "gated-gelu", max_positions: int = 512):
    """A randomly initialised T5ForConditionalGeneration / BartForConditionalGeneration whose
    vocabulary and special ids are the tokenizer's."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "t5":
        cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                       num_decoder_layers=layers, num_heads=heads, feed_forward_proj=feed_forward_proj,
                       dropout_rate=dropout, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        return T5ForConditionalGeneration(cfg)
    if arch == "bart":
        cfg = BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                         encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=d_ff,
                         decoder_ffn_dim=d_ff, dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
                         max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                         scale_embedding=False, tie_word_embeddings=True)
        return BartForConditionalGeneration(cfg)
    raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")


def init_model(arch: str, out_dir: str | os.PathLike, texts: list[str], **sizes):
    """Train a tokenizer on ``texts``, build a random ``arch`` model ('t5' or 'bart'), save both
    with ``save_pretrained`` in ``out_dir`` and return ``(model, tokenizer)``.

    ``sizes`` (defaults in ``DEFAULTS``): ``vocab_size``, ``d_model``, ``layers`` (encoder and
    decoder each), ``heads``, ``d_ff``, ``dropout``, ``seed``, ``feed_forward_proj`` (T5:
    'gated-gelu', 'relu', ...), ``max_positions`` (BART's learned positions; also the tokenizer's
    ``model_max_length``), ``extra_ids`` (T5 sentinels). ``out_dir`` also gets ``fsam_init.json``
    recording these settings.
    """
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"init_model got unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in sizes.items() if v is not None}}
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    texts = list(texts)
    if arch == "t5":
        tokenizer = train_t5_tokenizer(texts, opts["vocab_size"], opts["extra_ids"])
    else:
        tokenizer = train_bart_tokenizer(texts, opts["vocab_size"])
    tokenizer.model_max_length = opts["max_positions"]
    model = build_model(arch, tokenizer, d_model=opts["d_model"], layers=opts["layers"], heads=opts["heads"],
                        d_ff=opts["d_ff"], dropout=opts["dropout"], seed=opts["seed"],
                        feed_forward_proj=opts["feed_forward_proj"], max_positions=opts["max_positions"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"arch": arch, **opts, "tokenizer_vocab": len(tokenizer), "parameters": n_params,
            "tokenizer_texts": len(texts)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("saved a random %s (%d parameters, vocabulary %d) to %s", arch, n_params, len(tokenizer), out)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from .data import load_examples

    ap = argparse.ArgumentParser(prog="python -m fsam_dist.seq2seq.init_model", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, required=True)
    ap.add_argument("--out", required=True, help="directory to save the model and tokenizer in")
    ap.add_argument("--train-file", required=True,
                    help="text for the tokenizer: a .jsonl/.csv training file or builtin:NAME (its train split)")
    ap.add_argument("--source-field", default="source")
    ap.add_argument("--target-field", default="target")
    ap.add_argument("--prefix", default="",
                    help="task prefix the sources will carry (so its words are in the vocabulary)")
    ap.add_argument("--max-texts", type=int, default=None, help="train the tokenizer on at most this many examples")
    ap.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    ap.add_argument("--d-model", type=int, default=DEFAULTS["d_model"])
    ap.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="encoder layers = decoder layers")
    ap.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    ap.add_argument("--d-ff", type=int, default=DEFAULTS["d_ff"])
    ap.add_argument("--dropout", type=float, default=DEFAULTS["dropout"])
    ap.add_argument("--feed-forward-proj", default=DEFAULTS["feed_forward_proj"], help="T5 only")
    ap.add_argument("--max-positions", type=int, default=DEFAULTS["max_positions"])
    ap.add_argument("--extra-ids", type=int, default=DEFAULTS["extra_ids"], help="T5 sentinel tokens")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        examples, report = load_examples(args.train_file, "train", source_field=args.source_field,
                                         target_field=args.target_field, prefix=args.prefix,
                                         max_examples=args.max_texts)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    texts = [ex["source"] for ex in examples] + [ex["target"] for ex in examples]
    model, tokenizer = init_model(args.arch, args.out, texts, vocab_size=args.vocab_size, d_model=args.d_model,
                                  layers=args.layers, heads=args.heads, d_ff=args.d_ff, dropout=args.dropout,
                                  seed=args.seed, feed_forward_proj=args.feed_forward_proj,
                                  max_positions=args.max_positions, extra_ids=args.extra_ids)
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters())} parameters, vocabulary {len(tokenizer)}, "
          f"tokenizer trained on {len(texts)} texts from {report.source} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
