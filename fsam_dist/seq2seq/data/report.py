"""What loading one split did: rows read, examples kept, bad rows by reason with their first line numbers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_BAD_EXAMPLES = 5  # line numbers kept per kind of problem


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
