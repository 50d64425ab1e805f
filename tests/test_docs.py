"""Docs that are generated must be current."""

from pathlib import Path

from fsam_dist.config import README_BEGIN, README_END, markdown_table

REPO = Path(__file__).resolve().parent.parent


def test_readme_config_table_is_generated_from_the_config():
    text = (REPO / "README.md").read_text()
    table = text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)].strip()
    assert table == markdown_table(), "run `python -m fsam_dist.config --write-readme`"


def test_readme_first_screen_has_the_two_commands():
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen


def test_shipped_training_configs_validate():
    from fsam_dist.config import load_config

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


# ---- every path and command the docs name exists ---------------------------------------------------

import importlib.util  # noqa: E402
import re  # noqa: E402

PATH = re.compile(r"(?<![\w/.~-])((?:fsam_dist|launch|configs|bench|docs|tests|\.ci)/[\w./{},<>*-]*[\w}>*])")
PLACEHOLDER = re.compile(r"[{}<>*]")   # configs/deepspeed/zero{0,1,2,3}.json, configs/<train>.yaml
MODULE = re.compile(r"python3? -m ([\w.]+)")
SCRIPT = re.compile(r"(?<![\w/.-])(fsam-[a-z][a-z-]*[a-z])\b")
MAKE = re.compile(r"\bmake ([a-z][\w-]*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
NOT_COMMANDS = {"fsam-dist", "fsam-fault"}   # the distribution's name; the fault-injection log prefix


def _help_texts() -> dict[str, str]:
    """What `--help` and the module docstrings that serve as help show."""
    from fsam_dist import cli, config
    from fsam_dist.seq2seq import init_model

    texts = {"fsam-train --help": cli.USAGE, "fsam_dist.config": config.__doc__,
             "fsam-init-model --help": init_model.__doc__,
             "launch/train.py": (REPO / "launch" / "train.py").read_text()}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        texts[str(path.relative_to(REPO))] = "\n".join(l for l in path.read_text().splitlines() if l.startswith("#"))
    return texts


def _documents() -> dict[str, tuple[Path, str]]:
    docs = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = {str(p.relative_to(REPO)): (p.parent, p.read_text()) for p in docs}
    found.update({name: (REPO, text) for name, text in _help_texts().items()})
    return found


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))


def _console_scripts() -> set[str]:
    import tomllib

    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def test_every_path_and_command_named_in_the_docs_exists():
    missing = []
    targets, scripts = _make_targets(), _console_scripts()
    for name, (base, text) in _documents().items():
        for path in PATH.findall(text):
            if not PLACEHOLDER.search(path) and not (REPO / path).exists():
                missing.append(f"{name}: path {path}")
        for link in LINK.findall(text):
            if "://" not in link and not link.startswith("mailto:") and not (base / link).exists():
                missing.append(f"{name}: link {link}")
        for module in MODULE.findall(text):
            module = module.rstrip(".")
            if module not in ("pip", "venv", "pytest", "torch.distributed.run") and \
                    importlib.util.find_spec(module) is None:
                missing.append(f"{name}: python -m {module}")
        for script in SCRIPT.findall(text):
            if script not in scripts and script not in NOT_COMMANDS:
                missing.append(f"{name}: command {script}")
        for target in MAKE.findall(text):
            if target not in targets:
                missing.append(f"{name}: make {target}")
    assert not missing, "\n".join(missing)


def test_the_docs_check_catches_what_it_claims_to():
    """The patterns above find each kind of reference (so the test above can fail)."""
    text = ("see fsam_dist/core/nope.py, [x](nope.md), `python -m fsam_dist.nope`, `fsam-config-doc`, "
            "`make nope`")
    assert PATH.findall(text) == ["fsam_dist/core/nope.py"] and LINK.findall(text) == ["nope.md"]
    assert MODULE.findall(text) == ["fsam_dist.nope"] and SCRIPT.findall(text) == ["fsam-config-doc"]
    assert MAKE.findall(text) == ["nope"]


def test_design_map_names_every_module():
    """docs/design.md is the map a newcomer reads first: every module of the package is on it."""
    design = (REPO / "docs" / "design.md").read_text()
    modules = [p for p in (REPO / "fsam_dist").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert modules
    missing = [str(p.relative_to(REPO)) for p in modules if p.name not in design]
    assert not missing, f"docs/design.md does not mention {missing}"


def test_section_citations_point_at_existing_sections():
    """Docstrings cite docs/design.md by section number; each cited section exists, and nothing
    cites the DESIGN.md that is not in the repository."""
    design = (REPO / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    cited, stale = set(), []
    for path in (REPO / "fsam_dist").rglob("*.py"):
        text = path.read_text()
        cited |= {(str(path.relative_to(REPO)), n) for n in re.findall(r"design\.md §(\d+)", text)}
        if "DESIGN.md" in text:
            stale.append(str(path.relative_to(REPO)))
    assert sections and cited
    assert not stale, f"{stale} cite DESIGN.md, which is not in the repository (cite docs/design.md §N)"
    assert all(n in sections for _, n in cited), sorted(c for c in cited if c[1] not in sections)
