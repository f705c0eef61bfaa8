"""Formulas and constants that both engines (and the profiler) use, each defined once, torch-free.

One module per subject; each formula cites the library code or paper it follows.
"""
