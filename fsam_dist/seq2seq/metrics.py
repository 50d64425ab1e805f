"""Generation metrics: exact match, BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), and edit-
distance error rates. Every score is on a 0–100 scale.

``compute_metrics(predictions, references, task)`` returns:

* ``exact_match`` — % of predictions equal to their reference after stripping and collapsing
  whitespace (case kept).
* ``bleu`` — corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing); pass
  ``bleu_tokenize='zh'``/``'char'`` etc. for languages without spaces.
* ``chrf`` — corpus chrF (character 6-grams, β = 2), language-independent: the main score for
  translation and GEC here.
* ``rouge1``, ``rouge2``, ``rougeL`` — mean F-measure over pairs (rouge-score), tokenised on
  Unicode word characters after lower-casing (rouge-score's own tokenizer drops every non-Latin
  letter, which would score Ukrainian as 0).
* ``wer`` — total word edit distance (substitutions + insertions + deletions over
  space-separated tokens) / total reference words.
* ``task='g2p'`` (grapheme→phoneme): ``per`` — phoneme error rate, the edit distance over the
  space-separated phonemes / reference phonemes; and ``wer`` is the G2P word error rate instead,
  the % of words whose pronunciation is not exactly right (= 100 − exact_match).

``PRIMARY_METRIC[task]`` gives ``(name, 'max'|'min')`` for model selection.
"""

from __future__ import annotations

import re

PRIMARY_METRIC = {"g2p": ("per", "min"), "gec": ("chrf", "max"), "translation": ("chrf", "max"), None: ("chrf", "max")}
TASKS = ("g2p", "gec", "translation", None)


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _norm(text: str) -> str:
    return " ".join(text.split())


class _UnicodeWordTokenizer:
    """rouge-score tokenizer: lower-cased Unicode word characters (any script)."""

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


def _error_rate(predictions: list[str], references: list[str]) -> float:
    edits = total = 0
    for p, r in zip(predictions, references):
        ref = r.split()
        edits += edit_distance(p.split(), ref)
        total += len(ref)
    return 100.0 * edits / max(total, 1)


def compute_metrics(predictions: list[str], references: list[str], task: str | None = None, *,
                    bleu_tokenize: str | None = None) -> dict[str, float]:
    """Scores of ``predictions`` against ``references`` (one reference each), all 0–100; see the
    module docstring. ``task``: 'g2p', 'gec', 'translation' or None."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {TASKS}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    if n == 0:
        raise ValueError("compute_metrics got no predictions")
    preds = [_norm(p) for p in predictions]
    refs = [_norm(r) for r in references]
    out: dict[str, float] = {"exact_match": 100.0 * sum(p == r for p, r in zip(preds, refs)) / n}
    bleu_kwargs = {"tokenize": bleu_tokenize} if bleu_tokenize else {}
    out["bleu"] = float(sacrebleu.corpus_bleu(preds, [refs], **bleu_kwargs).score)
    out["chrf"] = float(sacrebleu.corpus_chrf(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_UnicodeWordTokenizer())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        scores = scorer.score(r, p)  # score(target, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    out.update({key: 100.0 * value / n for key, value in totals.items()})
    if task == "g2p":
        out["per"] = _error_rate(preds, refs)
        out["wer"] = 100.0 - out["exact_match"]
    else:
        out["wer"] = _error_rate(preds, refs)
    out["n"] = n
    return out
