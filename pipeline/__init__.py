"""inception-ray: prepare, train and score image classifiers on Ray."""

__version__ = "0.1.0"
