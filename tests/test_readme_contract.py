"""The README is the contract: the commands a newcomer types are the ones CI runs, verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The command lines of the README's first shell block (install, run, tests)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert block, "the README has no ```bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readme_commands_verbatim() -> None:
    commands = readme_commands()
    assert commands[0] == 'pip install -e ".[dev]"' and "python -m pytest -q" in commands
    ci_lines = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f"{command!r} is in the README but not run by .ci/run"


def test_ci_exports_no_environment_variable() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert not re.search(r"^\s*export\s", script, flags=re.M)
    assert not re.search(r"^\s*[A-Z_]+=\S+\s+python", script, flags=re.M)
