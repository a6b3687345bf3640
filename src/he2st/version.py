"""The package version, in one place (imported by the model card and results provenance)."""

__version__ = "0.2.0"
