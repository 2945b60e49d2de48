"""Where a model came from and where its training is watched: lineage (data
manifest, code, library versions, recipe, warm-start parent), live TensorBoard
scalars, and optional MLflow tracking. Imports only storage, config and errors."""
