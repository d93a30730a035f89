"""The `bulkinfer` package itself: what importing it does to the user's process."""

import subprocess
import sys

import pytest

IMPORT_THEN_WARN = """
import logging
import bulkinfer
from bulkinfer.tasks import run  # imports Beam, whose BigQuery clients warn when apitools is absent
logging.getLogger().warning("a user's own warning")
"""


def test_importing_bulkinfer_hides_beams_apitools_warning_and_no_other():
    without = subprocess.run([sys.executable, "-c", "import apache_beam"], capture_output=True, text=True, timeout=120)
    if "apitools not found" not in without.stderr:
        pytest.skip("Beam does not warn about apitools in this environment: nothing to hide")
    done = subprocess.run([sys.executable, "-c", IMPORT_THEN_WARN], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "apitools" not in done.stderr
    assert "a user's own warning" in done.stderr
