"""Comparing runs: collect run folders, fit scaling laws, draw plots, write a markdown report."""
