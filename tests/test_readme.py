"""The README's Python example runs as written (on the shipped model)."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def _python_blocks(section: str) -> list[str]:
  text = README.read_text("utf-8")
  body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_generation_example_runs(capsys):
  blocks = _python_blocks("Generating from Python")
  assert len(blocks) == 1
  exec(compile(blocks[0], "README.md", "exec"), {})  # asserts flash == lazy inside
  printed = capsys.readouterr().out
  assert len(printed) > 50  # the decoded continuation
