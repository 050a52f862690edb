"""Languini: a research kitchen for language modelling at fixed compute."""

__version__ = "0.1.0"
