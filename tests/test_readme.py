"""The README's examples run as written.

Every ```python block of README.md is executed on its own, in a fresh namespace (the blocks do not build on
each other, so each can be copied alone), on CPU tensors with the random-init ``fastvlm-tiny-vit`` model the
snippets load themselves. A block fails the test if it raises, including its own asserts (every block must
have at least one, on shapes or values). Line numbers in a traceback are the README's.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
METHODS = ("TaskRes", "RMT", "OrthCR", "PVP", "Composing tuners", "Any model")


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number of the code, code) of every fenced block of ``lang`` in the README."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) == lang:
            out.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return out


def _heading_before(line: int) -> str:
    """The bold label (``**Name**``) of the paragraph that introduces the block starting at ``line``."""
    lines = README.read_text(encoding="utf-8").splitlines()[: line - 1]
    for text in reversed(lines):
        m = re.match(r"\*\*([^*]+)\*\*", text)
        if m:
            return m.group(1)
    return ""


PYTHON = blocks("python")


def test_there_is_one_python_example_per_method():
    labels = [_heading_before(line) for line, _ in PYTHON]
    assert labels == list(METHODS), f"README python blocks are introduced by {labels}, expected {list(METHODS)}"


@pytest.mark.parametrize("line,code", PYTHON, ids=[_heading_before(line) or f"line{line}" for line, _ in PYTHON])
def test_readme_python_block_runs(line, code, capsys):
    assert re.search(r"^\s*assert\b", code, re.MULTILINE), f"README block at line {line} checks nothing (no assert)"
    # pad so that tracebacks and assertion messages give the README's own line numbers
    source = "\n" * (line - 1) + code
    exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), f"README block at line {line} prints nothing"


def test_readme_test_command_is_what_ci_runs():
    """CI (.ci/run) runs the README's test command word for word: the two must not drift apart."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci_cmds = [c for c in ci if "pytest" in c and not c.lstrip().startswith("#")]
    readme_cmds = [c for _, code in blocks("bash") for c in code.splitlines() if "pytest" in c]
    assert len(ci_cmds) == 1, f".ci/run should run pytest once, found {ci_cmds}"
    assert readme_cmds == ci_cmds, f"README test command {readme_cmds} differs from .ci/run's {ci_cmds}"
