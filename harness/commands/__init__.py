"""CLI command groups; each module exposes ``register(app, ls_app)``."""
