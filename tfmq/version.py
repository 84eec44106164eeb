"""The tfmq version, recorded in every checkpoint header (kept apart so the engine need not import the package face)."""
__version__ = "0.1.0"
