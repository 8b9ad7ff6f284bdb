"""The vectors package's bad-input errors, apart from the torch code that raises them, so a
front end can catch them without importing torch."""


class VectorFileError(ValueError):
    """A vector file is unreadable, unsafe or does not fit the model."""


class ActivationFileError(ValueError):
    """An activation file is unreadable or does not match its job."""
