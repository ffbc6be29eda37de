"""The one exception type that means "the user gave bad input"; the CLI turns it into exit code 2."""


class DlpipeError(Exception):
    """Bad input (params, files, sources). The message is one line naming the offending key/file/value."""
