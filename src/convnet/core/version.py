"""The package's version, in a module of its own: the run folder records it, the command
line prints it, the build reads it (``pyproject.toml``), and none of them imports more."""

__version__ = "0.2.0"
