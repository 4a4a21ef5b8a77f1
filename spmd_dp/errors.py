"""The two kinds of failure a user sees, and the exit codes they map to.

`UsageError` is bad config, bad input or a bad environment: it is found before a
model loads, its message is one line naming the place and the fix, and the
process exits with code 2. Anything else is a run failure (exit code 1).
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad config, input or environment: one line that names the place and the fix.

    quiet: another rank (rank 0) prints the line; this one only reports it to torchrun."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class RunFailure(Exception):
    """The run could not finish (no engine started, a batch timed out, ...)."""


class PeerLost(RunFailure):
    """Another rank left the run (its own line says why); this one stops too."""


class Drained(Exception):
    """The run stopped early on a signal, after committing what finished (exit code 128 + the signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.code = 128 + signum
