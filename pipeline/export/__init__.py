"""The serving export: a trained model (run directory or registry version) as
a TensorFlow SavedModel that carries its labels and its preprocessing recipe
in the graph, and optionally as TFLite files.

- ``graph``: the recipe as TensorFlow ops (decode, EXIF orientation, colour,
  ``max_side``, the one resize, rounding to uint8 as scoring does) and the
  ``tf.Module`` with the serving signatures.
- ``savedmodel``: ``export_model`` (a loaded artifact to a local folder) and
  ``export_run`` (a model reference to ``RUN/export/`` on any storage, with
  ``export.json`` written last).
- ``tflite``: float32 and dynamic-range quantised TFLite from the pixels
  signature.

docs/export.md describes the signatures and where the in-graph decode differs
from the Pillow path of ``jobs.score``.
"""

from pipeline.export.savedmodel import EXPORT_DIR, EXPORT_MARKER, export_model, export_run

__all__ = ["EXPORT_DIR", "EXPORT_MARKER", "export_model", "export_run"]
