"""``python -m trainer_core`` is the ``trainer`` command."""

from trainer_core.cli import main

if __name__ == "__main__":
    main()
