"""Errors a user sees as one line: every room raises these, the CLI prints them and exits 1."""


class AdapterzooError(Exception):
    """A problem with the user's input, explained in one line."""

    def json_details(self) -> dict:
        """What a --json caller gets beside the message (the one line may have to shorten a list)."""
        return {}


class BadFileError(AdapterzooError):
    """The file is truncated, corrupt or not in any format we read."""


class UnsafeFileError(BadFileError):
    """A pickle that needs code we refuse to run; nothing in it was executed."""


class Cancelled(BaseException):
    """Raised from a progress callback to stop a long job (the web page's Cancel). A BaseException, like
    KeyboardInterrupt, so the `except Exception` that keeps a batch going past one bad file lets it through."""
