"""Run the whole suite on two workers (pytest-xdist; `-n 0` after it runs in one process); an empty selection (pytest
exit 5) is a failure, never a silent pass."""

import sys

import pytest

NO_TESTS_COLLECTED = 5

code = pytest.main(["-q", "-n", "2", *sys.argv[1:]])
if code == NO_TESTS_COLLECTED:
    print("tests/run.py: pytest collected no tests; treating that as a failure", file=sys.stderr)
    code = 1
sys.exit(code)
