"""The one exception type that means "the user gave bad input"; the CLI turns it into exit code 2."""


class DlpipeError(Exception):
    """Bad input (params, files, sources). The message is one line naming the offending key/file/value."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its type's name when it has none), for a one-line
    DlpipeError that wraps it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Interrupted(Exception):
    """A stage stopped by a signal (SIGTERM, Ctrl-C); the CLI exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name}")
