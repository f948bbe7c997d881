"""graft: a reproducible image transfer-learning pipeline (DVC stages, Prefect runs, lineage).

The library: ``graft.config`` (params), ``graft.data`` (verification, decoding, dataset
layout, ingest and split), ``graft.training`` (models, weights, checkpoints, the loop),
``graft.evaluation``, ``graft.registry`` (package, publish, versions, lineage) and
``graft.cli`` (the ``graft`` command). Importing it changes no global state.
"""
