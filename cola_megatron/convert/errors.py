"""The one error conversion raises for bad input."""


class ConversionError(ValueError):
    """Input the conversion cannot use; the message names the problem and the fix. Raised before heavy work."""
