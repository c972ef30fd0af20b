"""Ahead-of-time compilation reports of the Triton kernels (development tooling, not shipped):
``compile.py`` compiles and reads back resources, ``specs.py`` lists what to compile."""
