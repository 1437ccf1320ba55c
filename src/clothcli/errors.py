"""One exception type for mistakes the user can fix; the CLI turns it into a message and exit 2."""


class UserError(Exception):
    """Bad input (path, config, option, file): reported as one clear line, exit code 2."""
