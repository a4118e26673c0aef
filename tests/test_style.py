"""The code passes flake8 with the project's settings (setup.cfg): unused imports, undefined
names and lines over 100 characters fail the suite, not a later reader."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec('flake8') is None,
                    reason='flake8 is not installed (requirements/tests.txt)')
def test_flake8_clean():
    proc = subprocess.run([sys.executable, '-m', 'flake8', 'overlock_mm', 'tools', 'tests',
                           'configs'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'flake8 findings (run `make lint`):\n{proc.stdout}{proc.stderr}'
