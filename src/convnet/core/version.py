"""The package's version and its distribution's name, in a module of their own: the run
folder records the version, the command line prints it, the build reads it
(``pyproject.toml``), and none of them imports more.

The distribution is ``convnet-toolkit`` (on PyPI, ``convnet`` is another project's); the
import name and the command stay ``convnet``."""

__version__ = "0.3.0"
DISTRIBUTION = "convnet-toolkit"


def install_hint(extra: str) -> str:
    """How to install an extra: ``pip install 'convnet-toolkit[tune]'`` (from a clone: ``-e '.[tune]'``)."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (from a clone: pip install -e '.[{extra}]')"
