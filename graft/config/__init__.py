"""params.yaml as validated, typed settings, and checks of those settings against this machine."""
