"""Docs that are generated must be current."""

from pathlib import Path

from fsam_dist.config import README_BEGIN, README_END, markdown_table

REPO = Path(__file__).resolve().parent.parent


def test_readme_config_table_is_generated_from_the_config():
    text = (REPO / "README.md").read_text()
    table = text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)].strip()
    assert table == markdown_table(), "run `python -m fsam_dist.config --readme`"


def test_readme_first_screen_has_the_two_commands():
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen


def test_shipped_training_configs_validate():
    from fsam_dist.config import load_config

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
