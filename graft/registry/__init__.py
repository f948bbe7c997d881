"""The registered model: package and card, published versions, lineage of any version."""
