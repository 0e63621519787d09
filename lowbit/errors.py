"""One exception type for problems a user can fix; the CLI prints it as a single line."""


class LowbitError(Exception):
    """Bad input or an unrecoverable numerical condition, with a message that says what to do."""


class ResumeMismatch(LowbitError):
    """Stored progress belongs to another model, recipe or calibration set (or lowbit version); a caller may start
    afresh."""
