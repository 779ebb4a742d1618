"""FastAPI service: ``/search``, ``/classify``, ``/chat``, ``/images``, ``/health``, ``/metrics``.

``api.app.create_app(settings)`` builds the app; ``python -m api`` serves it.
"""
