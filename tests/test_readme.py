"""The README and docs/ stay true: CI runs the Quickstart's test command, the README stays short and
names every config, every relative link resolves, and the model zoo's table is what `count` prints."""

import fnmatch
import pathlib
import re

from cvolution_jax import count, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ZOO = (ROOT / "docs" / "zoo.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def quickstart_commands():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert "python -m experiments.imagenet --config experiments/configs/default.py" in commands[0]
    assert "[test]" in commands[1] and "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_readme_is_short():
    """What C-volution is, install, the two Quickstart commands and a table of tasks; the rest lives in docs/."""
    assert len(README.splitlines()) <= 210


def test_the_readme_task_table_names_every_config():
    """Each config in experiments/configs matches a name or pattern of the README's task table, and
    each name or pattern there matches a config."""
    section = README.split("## Tasks", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`([\w*{},]+\.py)`", section))
    configs = {p.name for p in (ROOT / "experiments" / "configs").glob("*.py")} - {"__init__.py", "common.py"}
    assert {name for name in names if not any(fnmatch.fnmatch(c, name) for c in configs)} == set()
    assert {c for c in configs if not any(fnmatch.fnmatch(c, name) for name in names)} == set()


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a `# comment` in a code block is no heading
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def relative_links(page: pathlib.Path):
    """`(target, fragment)` of every markdown link that is not a URL, code blocks and spans left out."""
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, fragment = target.partition("#")
            yield path, fragment


def test_every_relative_link_resolves():
    assert len(PAGES) >= 9 and all(page.exists() for page in PAGES)
    broken = []
    for page in PAGES:
        for path, fragment in relative_links(page):
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {path} does not exist")
            elif fragment and (target.suffix != ".md" or fragment not in anchors(target)):
                broken.append(f"{page.relative_to(ROOT)}: {path}#{fragment} names no heading")
    assert broken == []


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Does C-volution help? A seeded ablation on Fashion-MNIST") == (
        "does-c-volution-help-a-seeded-ablation-on-fashion-mnist")
    assert github_anchor("The XLA path's backward on CPU") == "the-xla-paths-backward-on-cpu"
    assert github_anchor("Pallas on Triton: deprecated since jax 0.11") == "pallas-on-triton-deprecated-since-jax-011"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / path).resolve() for path, _ in relative_links(ROOT / "README.md") if path}
    assert {page for page in PAGES[1:]} - linked == set()


def test_model_table_matches_count():
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|", ZOO, flags=re.M)
    table = {name: (float(params), float(macs)) for name, params, macs in rows}
    assert sorted(table) == sorted(models.names())
    for name, (params_m, macs_g) in table.items():
        counted = count.count(models.create(name))
        assert (round(counted["params"] / 1e6, 2), round(counted["macs"] / 1e9, 2)) == (params_m, macs_g), name
