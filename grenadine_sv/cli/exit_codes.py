"""The command's exit codes (the README lists them)."""

EXIT_OK = 0  # done as asked
EXIT_FAILED = 1  # the supervisor answered but it did not happen (or a program is FATAL)
EXIT_USAGE = 2  # bad usage: unknown command, program, image or option; invalid configuration
EXIT_NOT_RUNNING = 3  # no supervisor answers on the control socket


class Exit(Exception):
    """End the command with this exit code (what went wrong has been printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
