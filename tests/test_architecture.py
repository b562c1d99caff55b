"""The house's arrows (DESIGN section 1): the import-linter contracts of pyproject.toml hold.

A lower room importing a higher one, an import cycle inside a room, or Lightning inside the experts or the
preparation step fails here with import-linter's report (the same check `.ci/run` runs as ``lint-imports``).
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")
ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
