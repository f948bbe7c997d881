"""The ``graft`` command line."""
