"""The README's Python examples run as written (a stale name or signature there has been found by every review):
each ```python block, in one fresh process, from an empty folder, on the CPU, with the embedded models."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = (REPO / "helpers" / "models" / "embedded" / "llama-cs1" / "config.json").is_file()


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(readme_python_blocks()) >= 3  # one experiment, the kernel alone, the circuit workflow


@pytest.mark.skipif(not EMBEDDED, reason="the README's examples use the embedded models")
def test_the_readme_python_examples_run(tmp_path):
    # one process for every block (one import of torch and transformers); each block a function of its own so that
    # one block's names do not stand in for another's
    script = "\n".join(f"def block_{i}():\n" + "".join(f"    {line}\n" for line in block.splitlines()) +
                       f"block_{i}()\nprint('block {i} ok', flush=True)\n"
                       for i, block in enumerate(readme_python_blocks()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PLOTLY_RENDERER": "json", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [f"block {i} ok" for i in range(len(readme_python_blocks()))] == \
        [line for line in run.stdout.splitlines() if line.startswith("block ")]
    assert (tmp_path / "outputs" / "mine").is_dir()  # the examples' save_experiment wrote where they say
