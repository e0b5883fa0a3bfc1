"""The README stays true: CI runs its Quickstart test command, and its model table is what `count` prints."""

import pathlib
import re

from cvolution_jax import count, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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


def test_model_table_matches_count():
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|", README, flags=re.M)
    table = {name: (float(params), float(macs)) for name, params, macs in rows}
    assert sorted(table) == sorted(models.names())
    for name, (params_m, macs_g) in table.items():
        counted = count.count(models.create(name))
        assert (round(counted["params"] / 1e6, 2), round(counted["macs"] / 1e9, 2)) == (params_m, macs_g), name
