"""User-facing errors: a short paragraph and a non-zero exit instead of a traceback."""


class UserError(Exception):
    """Something the user can fix (a path, a config value, a file). The message says how."""


EXIT_USER_ERROR = 2
