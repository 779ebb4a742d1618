"""The web page (static files served at ``/``) and the thumbnails it shows (``GET /thumbs/{id}``)."""

from __future__ import annotations

from pathlib import Path

#: the page's files, shipped as package data
STATIC_DIR = Path(__file__).resolve().parent / "static"
