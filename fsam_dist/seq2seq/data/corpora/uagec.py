"""``builtin:uagec`` / ``builtin:uagec-fluency``: Ukrainian grammatical error correction pairs from UA-GEC.

PyPI ``ua-gec`` (CC-BY-4.0), sentence pairs from the "gec-only" (or "gec-fluency") annotation
layer. source = original sentence, target = corrected sentence (first annotator); runs of
whitespace are collapsed to one space. test = the corpus's official test partition; validation =
5 % of the official train documents (split by document, so no document spans two splits);
train = the rest.
"""

from __future__ import annotations

import csv
from collections import Counter

from ..report import DataReport
from . import MissingPackageError, assign, hash_unit, package_dir

def load(split: str, seed: int, layer: str) -> tuple[list[dict], DataReport]:
    root = package_dir("ua_gec", "ua-gec", "uagec") / "data"
    if not (root / "metadata.csv").is_file():
        raise MissingPackageError(f"builtin:uagec: {root / 'metadata.csv'} is missing; reinstall: "
                                  f"`pip install --force-reinstall ua-gec`")
    report = DataReport(source=f"builtin:uagec{'-fluency' if layer == 'gec-fluency' else ''}", split=split)
    with open(root / "metadata.csv", encoding="utf-8", newline="") as f:
        meta = list(csv.DictReader(f))
    keyed, sizes, unchanged = [], Counter(), 0
    for row in meta:
        doc, partition = row["id"], row["partition"]
        annotators = row["annotator_id"].split()
        # The official test partition is the test split; 5 % of the train documents validate.
        which = "test" if partition == "test" else assign(doc, seed, 0.05, 0.0)[0]
        docs_dir = root / layer / partition
        src_path = docs_dir / "source-sentences" / f"{doc}.src.txt"
        if which != split:
            # Only count sizes; reading the other splits' files is not needed.
            sizes[which + "_documents"] += 1
            continue
        sizes[which + "_documents"] += 1
        tgt_path = docs_dir / "target-sentences" / f"{doc}.a{annotators[0]}.txt" if annotators else None
        if tgt_path is None or not src_path.is_file() or not tgt_path.is_file():
            report.add_bad("document without sentence files", None)
            continue
        src = src_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        tgt = tgt_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        if len(src) != len(tgt):
            report.rows += len(src)
            report.add_bad("document whose source and target sentences do not align", None)
            continue
        for i, (s, t) in enumerate(zip(src, tgt)):
            report.rows += 1
            s, t = " ".join(s.split()), " ".join(t.split())  # 135 pairs differ only in doubled spaces
            if not s or not t:
                report.add_bad("empty sentence", None)
                continue
            unchanged += s == t
            key = f"{doc}:{i}"
            keyed.append((hash_unit(seed, key), key, {"id": f"uagec:{key}", "source": s, "target": t}))
    keyed.sort(key=lambda t: (t[0], t[1]))
    report.info.update(documents=len(meta), split_documents=dict(sizes), annotation_layer=layer,
                       unchanged_pairs=unchanged,
                       license="UA-GEC (Grammarly), CC-BY-4.0: Syvokon et al., 'UA-GEC: Grammatical Error "
                               "Correction and Fluency Corpus for the Ukrainian Language', UNLP 2023")
    return [ex for _, _, ex in keyed], report
