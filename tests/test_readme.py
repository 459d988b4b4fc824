"""The README's Python examples run as written (on the shipped model), in order, sharing one
namespace as a reader's session would; the mesh example needs 8 devices and is run by
tests/test_sharding.py's checks instead."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def _python_blocks(section: str) -> list[str]:
  text = README.read_text("utf-8")
  body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_python_examples_run(capsys, tmp_path, monkeypatch):
  blocks = _python_blocks("Generating from Python")
  runnable = [b for b in blocks if "make_mesh" not in b]
  assert len(blocks) == 4 and len(runnable) == 3
  monkeypatch.chdir(tmp_path)  # the distillation example saves a checkpoint
  namespace = {}
  for block in runnable:  # asserts flash == lazy and chunks == one call inside
    exec(compile(block, "README.md", "exec"), namespace)
  printed = capsys.readouterr().out
  assert len(printed) > 50  # the decoded continuations
  assert namespace["out"].tokens.shape == (1, 2000)  # modal, past l_max = 1024
  assert (tmp_path / "byte_lm_16" / "distilled.safetensors").is_file()
