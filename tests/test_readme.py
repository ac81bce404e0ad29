"""Every code block of README.md runs: the Python blocks in order in one namespace, the shell
blocks in order in one directory; the set-up and test commands are the ones CI runs."""
import os
import re
import stat
import subprocess
import sys
import warnings
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
    for step in ('pip install -e ".[test]"', 'pip install -e ".[spark]"'):
        assert step in text and step in ci, step
    assert "\npytest\n" in text and "pytest -q" in ci


def _is_setup(block: str) -> bool:
    return "pip install" in block or block.strip() == "pytest"


def test_readme_shell_blocks_run(tmp_path):
    """The shell blocks (main job, shell quick start, ...) run with `cypq` being this
    interpreter's cypq; set-up blocks are what .ci/run runs (test above)."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
              if not _is_setup(b)]
    assert any("cypq demo" in b for b in blocks) and any("cypq build" in b for b in blocks)
    shim = tmp_path / "bin"
    shim.mkdir()
    for name, arg in (("cypq", "-m cypq "), ("cypq-bulk-load", "-m cypq build "),
                      ("python", "")):
        (shim / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {arg}"$@"\n')
        (shim / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
               MPLBACKEND="Agg")
    work = tmp_path / "work"
    work.mkdir()
    (work / "tools").symlink_to(README.parent / "tools")  # the README runs from the repo root
    try:
        import pyarrow  # noqa: F401
        import pyspark  # noqa: F401
        spark = True
    except ImportError:
        spark = False
    for i, block in enumerate(blocks):
        if "spark_lopq.py" in block and not spark:
            warnings.warn("README's Spark block not run: pyspark / pyarrow not installed")
            continue
        r = subprocess.run(["bash", "-e", "-c", block], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"README shell block {i + 1} failed:\n{block}\n{r.stderr}"
    if (work / "sift-index").exists():  # the shell quick start left what it says
        from cypq import Index, LOPQModel
        with Index.open(work / "sift-index", readonly=True) as ix:
            assert len(ix) == 30000
            assert ix.model == LOPQModel.load_proto(work / "sift.lopq")
        assert (work / "model-copy.lopq").exists()
        try:
            import matplotlib  # noqa: F401
            assert (work / "recall.png").read_bytes()[:4] == b"\x89PNG"
        except ImportError:  # cypq bench says so and writes no plot
            pass
    if (work / "spark-index").exists():  # the Spark path built an index from Spark's codes
        from cypq import Index
        with Index.open(work / "spark-index", readonly=True) as ix:
            assert len(ix) == 20000
            # the Spark search's results are Index.search's on the same codes
            import numpy as np
            import pyarrow.parquet as pq

            from cypq.demo import load_sample
            got = pq.read_table(work / "results").sort_by("query_id")
            want = ix.search(load_sample()["query"].astype(np.float32), k=10, quota=2000)[1]
            assert np.array_equal(np.stack(got["ids"].to_numpy(zero_copy_only=False)), want)
            with Index.open(work / "spark-shards", readonly=True) as shards:
                assert len(shards) == 20000 and shards.stats()["shards"] == 3
                assert np.array_equal(shards.search(load_sample()["query"].astype(
                    np.float32), k=10, quota=2000)[1], want)
