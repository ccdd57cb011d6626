"""One exception type for problems the user can fix.

The CLI catches :class:`UserError` and prints its message on one line with no traceback, then exits
with status 2. Every message names the problem and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input (files, options, checkpoints) with a message saying how to fix it."""
