"""``builtin:django-<lang>``: English→<lang> user-interface strings from Django's gettext catalogues.

PyPI ``django`` (BSD-3-Clause): every ``django/**/locale/<lang>/LC_MESSAGES/*.po``, read with
``polib``. Header, untranslated, fuzzy, obsolete and plural entries are skipped, duplicate pairs
dropped. Split by English string: validation 10 %, test 10 %.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..report import DataReport
from . import MissingPackageError, assign, package_dir, package_version


def _polib():
    try:
        import polib
    except ImportError as e:
        raise MissingPackageError("builtin:django-<lang> needs the 'polib' package, which is not installed: run "
                                  "`pip install polib` (or `pip install 'fsam-dist[app]'`)") from e
    return polib


def catalogue_pairs(path: str | Path, skipped: Counter) -> list[tuple[str, str]]:
    """The (English, translation) pairs of one ``.po`` catalogue, stripped; every entry left out
    is counted in ``skipped`` by reason (obsolete, fuzzy, plural, untranslated). The header is not
    an entry."""
    pairs = []
    for entry in _polib().pofile(str(path), encoding="utf-8"):
        if entry.obsolete:
            skipped["obsolete"] += 1
        elif entry.fuzzy:
            skipped["fuzzy"] += 1
        elif entry.msgid_plural:
            skipped["plural"] += 1
        elif not entry.msgstr.strip() or not entry.msgid.strip():
            skipped["untranslated"] += 1
        else:
            pairs.append((entry.msgid.strip(), entry.msgstr.strip()))
    return pairs


def django_languages() -> list[str]:
    """Languages with a catalogue in Django's conf/locale (e.g. de, fr, pt_BR, zh_Hans)."""
    root = package_dir("django", "django", "django-<lang>") / "conf" / "locale"
    return sorted(d.name for d in root.iterdir() if (d / "LC_MESSAGES" / "django.po").is_file())


def load(lang: str, split: str, seed: int) -> tuple[list[dict], DataReport]:
    root = package_dir("django", "django", f"django-{lang}")
    django_version = package_version("django")
    files = sorted(root.glob(f"**/locale/{lang}/LC_MESSAGES/*.po"))
    if not files or lang == "en":
        langs = django_languages()
        raise ValueError(f"builtin:django-{lang}: Django {django_version} has no {lang!r} catalogue besides "
                         f"English; choose one of: {', '.join(x for x in langs if x != 'en')}")
    report = DataReport(source=f"builtin:django-{lang}", split=split)
    pairs, sizes, skipped = {}, Counter(), Counter()
    for path in files:
        for pair in catalogue_pairs(path, skipped):
            if pair in pairs:
                skipped["duplicate"] += 1
            else:
                pairs[pair] = None
    report.rows = len(pairs) + sum(skipped.values())
    keyed = []
    for k, (src, tgt) in enumerate(pairs):
        which, u = assign(src, seed, 0.10, 0.10)
        sizes[which] += 1
        if which == split:
            keyed.append((u, k, src, tgt))
    keyed.sort()
    report.info.update(catalogues=len(files), pairs=len(pairs), split_sizes=dict(sizes), skipped=dict(skipped),
                       django_version=django_version,
                       license="Django translation catalogues, BSD-3-Clause (Django Software Foundation and "
                               "individual contributors)")
    return [{"id": f"django-{lang}:{k}", "source": s, "target": t} for _, k, s, t in keyed], report
