"""The README's code blocks run, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index):
    source = PYTHON_BLOCKS[index]
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(source, f"README.md[python block {index}]", "exec"), namespace)
    if "trainer" in namespace:
        # The usage example must actually train the loss's proxies.
        loss_fn = namespace["loss_fn"]
        assert loss_fn.W.grad is not None and loss_fn.W.grad.abs().sum() > 0
    if "per_row" in namespace:
        assert namespace["per_row"].shape == (8,)


def test_readme_test_command_is_what_ci_runs():
    section = README.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).strip()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert command in ci_script
