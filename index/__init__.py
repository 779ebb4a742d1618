"""FAISS + SQLite image index: vectors, metadata, atomic saves, incremental folder builds."""

from index.index import FORMAT_VERSION, Index, IndexFormatError, IndexLockedError, IndexMismatchError

__all__ = ["FORMAT_VERSION", "Index", "IndexFormatError", "IndexLockedError", "IndexMismatchError"]
