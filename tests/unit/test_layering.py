"""The package's layering (import-linter's contracts in pyproject.toml): the speculative core and
the policies are pure, the control plane imports no torch, serving imports no training code, no
import cycles. A broken contract fails here with the chain of imports that breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_every_package_directory_is_in_the_wheel():
    """pyproject.toml lists the packages by hand (workers/ installs as cosine.workers): a package
    directory left out of the list would be missing from an installed (not editable) CoSine."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])

    def dotted(init: Path) -> str:
        parts = init.parent.relative_to(ROOT).parts
        return ".".join(("cosine", *parts) if parts[0] == "workers" else parts)

    assert {dotted(p) for p in [*ROOT.glob("cosine/**/__init__.py"), *ROOT.glob("workers/**/__init__.py")]} == listed
