"""Built-in datasets (entry-point group ``trainer.datasets``)."""
