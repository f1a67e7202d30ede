"""Built-in tasks (entry-point group ``trainer.tasks``)."""
