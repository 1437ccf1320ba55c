"""One exception type for mistakes the user can fix; the CLI turns it into a message and exit 2."""


class UserError(Exception):
    """Bad input (path, config, option, file): reported as one clear line, exit code 2."""


def require_packages(names: tuple[str, ...], purpose: str, extra: str) -> None:
    """A UserError naming the first of `names` that does not import, and the extra that installs it."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"{purpose} needs {name}: {extra}") from None
