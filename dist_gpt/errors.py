"""The one error type for mistakes a user can fix (bad config, missing file, ...)."""


class UserError(Exception):
    """A problem with the user's input. Launch scripts print its message on one line and exit non-zero."""
