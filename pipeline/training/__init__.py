"""Training: ``driver`` (plans and runs a Ray Train job, publishes the run),
``worker`` (the per-worker loop under MultiWorkerMirroredStrategy), ``model``
(InceptionV3 with a new head, the two phases), ``evaluate`` and ``reports``
(metrics and plots). ``model`` never imports Ray."""
