"""The one exception type that reaches the user as a single line (see `mnv2.cli.main`)."""


class UserError(Exception):
    """Bad input from the user: a missing path, a malformed file, an incompatible checkpoint, a wrong flag.

    The message must name the file, field or value and say what is wrong; the CLI prints it as one line and exits
    non-zero, without a traceback.
    """


class PeerError(UserError):
    """Another process of a torchrun job failed with a `UserError`; this one stops too. Rank 0 reports the original
    error; the CLI prints nothing for a `PeerError` on the other ranks, so the job's error appears once."""
