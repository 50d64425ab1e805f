"""Readers for user data files: JSONL/NDJSON/JSON (one object a line) and CSV/TSV (a header row).

Bad rows -- malformed JSON, a non-object line, a missing field, an empty or non-text value,
undecodable bytes -- are counted in the :class:`~.report.DataReport` (with the first few line
numbers) and skipped; reading never raises mid-file. A file with no good row raises one
``ValueError`` naming the file, the fields looked for and the commonest problems.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .report import DataReport

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
"""The file formats :func:`load_file` reads (``.json`` too is read one object a line)."""


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


def load_file(path: str, split: str, source_field: str, target_field: str) -> tuple[list[dict], DataReport]:
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
        raise ValueError(f"data file {str(p)!r}: unknown format {suffix!r}; use .jsonl/.ndjson/.json (one JSON "
                         f"object a line) or .csv/.tsv (with a header row)")
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
