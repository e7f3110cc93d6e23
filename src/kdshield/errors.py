"""The one exception type a user sees.

Anything wrong with *input* (files, columns, labels, settings) raises :class:`InputError`
before Ray starts; the command line prints its message as one line and exits non-zero.
"""


class InputError(ValueError):
    """Bad input named in one line: which input, and what is wrong with it."""
