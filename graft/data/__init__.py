"""Images in: verification, decoding, the ingested dataset layout, schemas, ingest and split."""
