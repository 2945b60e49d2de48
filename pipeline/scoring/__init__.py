"""Scoring image buckets into Parquet: exactly one row per input file.

- ``entries``: which URI-list entries are allowed (protocols, no ``..`` climbing).
- ``listing``: a prefix listed by Ray tasks, URI lists read by Ray Data, into plan files.
- ``parts``: the work units (``PartSpec``) and their plan files under ``OUTPUT/_plan/``.
- ``plan``: checks before Ray (``plan_score``) and the parts of a run (``prepare_parts``).
- (the output lease, one job at a time per output folder, is ``pipeline.storage.lease``)
- ``decode``: files -> uint8 model-size images, or a reason.
- ``predictor``: the model actor.
- ``commit``: the output schema and atomic publication of a part.
- ``execute``: the Ray tasks and actors of a run, and the driver's loop.
- ``progress``: parts done, rows/s, errors by reason, ETA.
"""
