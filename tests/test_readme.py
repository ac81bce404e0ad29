"""Every Python code block of README.md runs, in order, in one namespace."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message says which block
            raise AssertionError(f"README python block {i + 1} failed: {e!r}") from e


def test_readme_commands_match_ci():
    """The set-up and test commands the README gives are the ones .ci/run runs."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in text and 'pip install -e ".[test]"' in ci
    assert "\npytest\n" in text and "pytest -q" in ci
