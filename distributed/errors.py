"""The one error type a run stops itself with on purpose.

Each subclass's message says what went wrong and what to do, in the user's terms, and the run's
last checkpoint is intact when it is raised; the CLI prints the message, not a traceback.
"""


class RunStopped(RuntimeError):
    """A run stopped itself: the message says why and how to go on."""


class UntrustedCheckpoint(RunStopped):
    """A checkpoint file holds objects other than tensors and plain data: it is refused unopened."""
