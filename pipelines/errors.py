"""The one exception type for mistakes a user can make and fix."""


class FluxoError(Exception):
    """A user-fixable problem: the message names the file, field or value and the fix."""
