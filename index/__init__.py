"""FAISS + SQLite image index: vectors, metadata, atomic saves, incremental folder builds."""

from index.index import Index
from index.manifest import FORMAT_VERSION, IndexFormatError, IndexLockedError, IndexMismatchError

__all__ = ["FORMAT_VERSION", "Index", "IndexFormatError", "IndexLockedError", "IndexMismatchError"]
