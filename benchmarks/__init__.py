"""pytest-benchmark suites of fastconv (see conftest.py); layers.py lists the layers timed."""
