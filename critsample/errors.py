"""Errors a user can cause. The CLI prints their one sentence and exits with code 2."""


class UserError(ValueError):
    """Bad input or a missing resource, with a message that names the fix."""
