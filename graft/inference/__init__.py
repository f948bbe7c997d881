"""Using a registered model: predictions for new images, with the lineage of each."""
