"""The DVC stage entry points: one thin module per stage, run as ``python -m tasks.<stage>``.

Each reads params.yaml, calls the graft library and writes the outputs dvc.yaml declares. Run
from the project root (as DVC does); not installed with the library.
"""
