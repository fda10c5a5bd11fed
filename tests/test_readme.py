"""Every Python block of README.md runs as pasted (on the CPU under the Triton interpreter here),
so the examples cannot rot. Blocks run in order in one namespace, as a reader pasting them
into one session would."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


@pytest.mark.slow
def test_readme_python_blocks_run():
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - name the failing block
            raise AssertionError(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
