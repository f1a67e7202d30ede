"""A trainer-core extension that adds a model (``logreg``) and a dataset (``npz``)."""

__version__ = "0.1.0"
