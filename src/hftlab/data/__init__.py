"""Data: the shared record type, source specs and loaders for every data set hftlab reads."""

from hftlab.data.records import DataError, Example, normalize_prompt
from hftlab.data.spec import DataSpec

__all__ = ["DataError", "DataSpec", "Example", "normalize_prompt"]
