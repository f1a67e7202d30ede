"""Built-in models (entry-point group ``trainer.models``)."""
