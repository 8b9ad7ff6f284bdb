"""The errors that mean the user's input is wrong (a value, a file, a trait), not our code:
front ends print them as one ``error:`` line; any other exception keeps its traceback."""

from db import PersonaError
from vectors.errors import ActivationFileError, VectorFileError

USER_ERRORS: tuple[type[Exception], ...] = (PersonaError, VectorFileError, ActivationFileError)

__all__ = ["USER_ERRORS", "ActivationFileError", "PersonaError", "VectorFileError"]
