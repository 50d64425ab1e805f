"""Seq2seq examples: one entry point over user files and the bundled corpora, then tokens and batches.

``load_examples`` returns ``(examples, DataReport)`` where an example is ``{"source": str,
"target": str, "id": str}`` (``id`` names where the example came from -- ``train.jsonl:17``,
``cmudict:hello``, ``uagec:0042:3`` -- for prediction files and debugging). ``tokenize_examples``
and ``collate`` turn examples into model batches (labels padded with -100).

* **User files** (``spec`` is a path; :mod:`.readers`): ``.jsonl``/``.ndjson``/``.json`` = one
  JSON object per line, ``.csv``/``.tsv`` = a header row and one row per example; the fields are
  configurable (``source_field``/``target_field``). A path containing ``{split}`` is formatted
  with the split name (``data/{split}.jsonl``); any other path is used as it is for whichever
  split is asked (give one file per split). Bad rows are counted and skipped, with a warning; a
  file whose share of bad rows exceeds ``max_bad_fraction`` is one error.
* **Built-in corpora** (``spec = "builtin:NAME"``; :mod:`.corpora`): ``builtin:cmudict``
  (grapheme→phoneme), ``builtin:stress`` (lexical stress pattern) and ``builtin:spelling``
  (spelling correction), both on CMUdict words held out of the pretrained miniature's corpus, ``builtin:uagec`` / ``builtin:uagec-fluency`` (Ukrainian grammatical error
  correction), ``builtin:django-<lang>`` (English→<lang> UI strings). Keep ``seed`` fixed across
  training seeds so that the evaluation sets do not change.
"""

from __future__ import annotations

import logging

from .collate import collate, tokenize_examples
from .corpora import MissingPackageError, builtin_names, load_builtin, task_for_spec
from .readers import SUFFIXES, load_file
from .report import DataReport

__all__ = ["SPLITS", "SUFFIXES", "DataReport", "MissingPackageError", "TooManyBadRows", "builtin_names", "collate",
           "load_examples", "task_for_spec", "tokenize_examples"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}


class TooManyBadRows(ValueError):
    """A data file in which more than the allowed share of rows could not be read."""


def load_examples(spec: str, split: str, *, source_field: str = "source", target_field: str = "target",
                  prefix: str = "", max_examples: int | None = None, seed: int = 0,
                  max_bad_fraction: float | None = None) -> tuple[list[dict], DataReport]:
    """Load one split of a corpus as ``[{"source": ..., "target": ...}, ...]`` plus a :class:`DataReport`.

    ``spec``: a path with one of :data:`SUFFIXES` (``{split}`` in it is replaced by the split name)
    or ``builtin:cmudict`` / ``builtin:stress`` / ``builtin:spelling`` / ``builtin:uagec`` / ``builtin:uagec-fluency`` /
    ``builtin:django-<lang>``. ``split``: train / validation / test (``valid``, ``val``, ``dev``
    also mean validation). ``prefix`` is prepended to every source (T5 task prefixes such as
    ``"translate English to German: "``) -- then generate with ``prefix=""``. ``max_examples``
    keeps the first N examples of the split asked for (for built-ins the first N is a seeded
    random, nested subset). ``seed`` picks the built-in split (keep it fixed); it does not affect
    files. ``max_bad_fraction``: a file in which more than this share of the rows is bad raises
    :class:`TooManyBadRows` naming the file, the count and the first line numbers (None: no limit).
    """
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    split = _SPLIT_ALIASES[split]
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    spec = str(spec)
    if spec.startswith("builtin:"):
        examples, report = load_builtin(spec[len("builtin:"):], split, seed)
    else:
        examples, report = load_file(spec.replace("{split}", split), split, source_field, target_field)
        _check_bad_share(report, max_bad_fraction)
    if max_examples is not None and len(examples) > max_examples:
        report.capped = len(examples) - max_examples
        examples = examples[:max_examples]
    if prefix:
        examples = [{**ex, "source": prefix + ex["source"]} for ex in examples]
    report.good = len(examples)
    (logger.warning if report.n_bad else logger.info)(report.summary())
    return examples, report


def _check_bad_share(report: DataReport, max_bad_fraction: float | None) -> None:
    if max_bad_fraction is None or not report.rows or report.n_bad <= max_bad_fraction * report.rows:
        return
    lines = sorted(line for found in report.bad_lines.values() for line in found)[:10]
    reasons = "; ".join(f"{n}× {reason}" for reason, n in report.bad.most_common(3))
    raise TooManyBadRows(
        f"{report.source}: {report.n_bad} of {report.rows} rows ({report.n_bad / report.rows:.1%}) cannot be read "
        f"({reasons}; first at lines {', '.join(map(str, lines))}), more than the {max_bad_fraction:.1%} allowed "
        f"by data.max_bad_row_fraction; fix the file, or raise data.max_bad_row_fraction to train on the "
        f"{report.rows - report.n_bad} good rows")
