"""CogVideoX text-to-video inference in plain torch."""

__version__ = "0.1.0"
