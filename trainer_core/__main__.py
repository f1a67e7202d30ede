"""``python -m trainer_core`` is the ``trainer`` command."""

from trainer_core.launcher import stop_with_launcher

if __name__ == "__main__":
    stop_with_launcher()  # a process torchrun started stops when its launcher dies

    from trainer_core.cli import main

    main()
