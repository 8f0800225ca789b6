"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad data input: the message names the file or setting at fault and how to fix it."""
