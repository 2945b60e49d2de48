"""Data: from an image tree to the tensors a model trains on.

``images`` (opening files: formats, EXIF orientation, colour), ``preprocess``
(the one recipe from file bytes to model input), ``prepare`` (image tree to
TFRecord shards), ``shards`` (record format and manifest), ``shard_stream``
(streaming verified shards to a worker), ``input`` (the tf.data pipeline) and
``demo_data`` (the built-in demo set). Nothing here imports Ray.
"""
