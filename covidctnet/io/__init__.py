"""Reading scans into HU volumes, input checks, and the batch runner (manifest, resume, worker processes, Dask)."""
