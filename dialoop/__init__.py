"""Dialoop: the ChatGPT recipe as open software."""

__version__ = "0.1.0"
