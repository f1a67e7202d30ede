pytest_plugins = ["trainer_core.testing"]
