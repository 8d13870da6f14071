"""The README's code blocks run, and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# The repository root, wherever under tests/ this file lives.
ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
README = (ROOT / "README.md").read_text()
CI_SCRIPT = (ROOT / ".ci" / "run").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _bash_block(section: str) -> str:
    return re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).strip()


def _ci_commands():
    """The commands of .ci/run, comments and blank lines left out."""
    return [ln.strip() for ln in CI_SCRIPT.splitlines() if ln.strip() and not ln.startswith("#")]


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


def test_readme_test_command_is_ci():
    """The Tests section's command is CI's script, and the suite it names is the one the
    script runs last."""
    section = _section("Tests")
    assert _bash_block(section) == "bash .ci/run"
    suite = _ci_commands()[-1]
    assert suite.startswith("ruff check . && ruff format --check . && python -m pytest")
    assert f"`{suite}`" in section


def test_readme_install_pins_are_cis():
    """The install command pins the same torch / torchvision pair as CI, installed before
    the extra (else the extra's bare torchvision would pull a newer torch)."""
    install = _bash_block(_section("Install and run the retrieval benchmark"))
    first, *rest = [c.strip() for c in install.split("&&")]
    ci_pip = next(c for c in _ci_commands() if "torch==" in c)
    pins = re.findall(r"(torch(?:vision)?==[0-9.]+)", first)
    assert pins and pins == re.findall(r"(torch(?:vision)?==[0-9.]+)", ci_pip)
    assert rest == ["pip install -e '.[bench]'", "python benchmarks/retrieval.py"]
    assert "torchvision" in re.search(
        r"bench = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()
    ).group(1)
