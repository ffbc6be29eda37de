"""The one exception type that means "the user gave bad input"; the CLI turns it into exit code 2."""


class DlpipeError(Exception):
    """Bad input (params, files, sources). The message is one line naming the offending key/file/value."""


class Interrupted(Exception):
    """A stage stopped by a signal (SIGTERM, Ctrl-C); the CLI exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name}")
