"""smoke.py, the first command on a new device, passes on the CPU (slow: it trains, resumes and decodes SmolLM2)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_smoke_script_passes_on_the_cpu():
    p = subprocess.run([sys.executable, "smoke.py", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("\nok ") == 3 and "all checks passed" in p.stdout
