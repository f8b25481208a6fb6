"""The one exception type users see.

Every mistake a user can make (an unknown model name, a missing data set, a broken
file, a bad flag value) raises :class:`ConvnetError` with a message that names the bad
value and says what to do. The command line prints that message as one line and exits
with a non-zero status; anything else escaping is a bug in convnet.
"""

from __future__ import annotations


class ConvnetError(Exception):
    """A user-facing error: bad input, missing data, an impossible request."""


class DataError(ConvnetError):
    """A data file or data set is missing, unreadable or inconsistent."""


class InputError(ConvnetError, ValueError):
    """An input given for prediction (image, array, IDX file) cannot be used. Also a
    ValueError, as scikit-learn expects of an estimator given bad data.

    Attributes:
        path: the file it is about, where it is one of several inputs (None otherwise).
    """

    path: str | None = None


class RunError(ConvnetError):
    """A run folder is missing, incomplete or inconsistent."""


class RunComplete(RunError):
    """A run asked to resume has trained all its epochs: nothing is left to do. ``done`` says
    so (which run, how many epochs); the message adds how to train on from its weights,
    ``command`` (default: ``convnet train --init-from RUN``)."""

    def __init__(self, done: str, run: str = "", command: str | None = None) -> None:
        self.done, self.run = done, run
        super().__init__(f"{done}; to train on from its weights, start a new run: "
                         f"{command or f'convnet train --init-from {run}'}")


class TrainingDiverged(ConvnetError):
    """The loss became NaN or infinite."""
