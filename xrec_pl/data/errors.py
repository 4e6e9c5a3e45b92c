"""The error every data reader raises."""


class DataError(ValueError):
    """Bad or unsafe input data. The message starts with the offending file's path."""
