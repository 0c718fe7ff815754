"""Each module keeps to its concern: preparing data loads no corruption code, training no re-ranking or evaluation
orchestration (checked in a fresh interpreter, as this one has imported everything)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def modules_after_import(module: str) -> set[str]:
    """The names in sys.modules after `import module` in a fresh interpreter run from the repository root."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(("module", "absent"), [
    ("prepare", {"corruptions", "robustness", "rerank", "eval_inputs"}),
    ("train", {"rerank", "robustness", "corruptions", "eval_inputs"}),
    ("datasets", {"corruptions"}),
])
def test_a_script_imports_only_what_its_concern_needs(module: str, absent: set[str]):
    loaded = modules_after_import(module)
    assert module in loaded
    assert not absent & loaded, f"{module} imports {sorted(absent & loaded)}"
