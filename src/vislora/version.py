"""The version of vislora (read by the files and pages it writes)."""

__version__ = "0.1.0"
