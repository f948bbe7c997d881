"""graft stage code: one module per DVC stage plus the shared pieces they are built from."""
