"""pytest setup for the high-availability tests: the modules of this folder
and of test/integration (harness, pgproxy) are importable."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
