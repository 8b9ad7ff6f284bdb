"""SQLite store, trait definitions and the bundled trait library: the one source of truth."""

from db.errors import PersonaError, UnknownJobError, UnknownTraitError
from db.store import Job, Judgment, Response, Store, TraitSummary, VectorRecord
from db.traits import InstructionPair, TraitDefinition, TraitValidationError

__all__ = [
    "InstructionPair",
    "Job",
    "Judgment",
    "PersonaError",
    "Response",
    "Store",
    "TraitDefinition",
    "TraitSummary",
    "TraitValidationError",
    "UnknownJobError",
    "UnknownTraitError",
    "VectorRecord",
]
