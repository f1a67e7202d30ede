"""How every ``trainer`` command reports an error: one line on stderr and an
exit status, or the full traceback with ``--debug`` (or ``TRAINER_DEBUG=1``)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, TypeVar

import click

from trainer_core.errors import TrainerError

F = TypeVar("F", bound=Callable[..., Any])

debug_option = click.option(
    "--debug", is_flag=True, envvar="TRAINER_DEBUG", help="Show the full traceback of an error (or set TRAINER_DEBUG=1)."
)


def reports_errors(command: F) -> F:
    """Turn errors into one line on stderr and an exit status, unless ``--debug``."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            output_closed()
        except TrainerError as exc:
            if debug:
                raise
            echo_error(str(exc), exc)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if debug:
                raise
            echo_error(f"{type(exc).__name__}: {exc} (run again with --debug for the traceback)", exc)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


# What a shell reports for a program that SIGPIPE ended (128 + 13), as `yes | head -1` gives.
CLOSED_PIPE_STATUS = 141


def output_closed() -> NoReturn:
    """The reader of our output has gone (``trainer plugins | head -1``): stop as
    Unix tools do there, without a message, exit status 141.  Python ignores SIGPIPE,
    so a write raised ``BrokenPipeError``; what is still buffered for stdout goes to
    the null device, or the flush at exit would fail on the closed pipe again."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(CLOSED_PIPE_STATUS)


@contextlib.contextmanager
def closed_output_exits() -> Iterator[None]:
    """Call :func:`output_closed` when the body writes to a closed pipe."""
    try:
        yield
    except BrokenPipeError:
        output_closed()


def echo_error(message: str, exc: BaseException) -> None:
    """Print ``error: message`` on stderr, on one line.  In one process of a distributed
    run, name its rank and leave the message for torchrun's failure report."""
    from trainer_core.launcher import record_error, worker_label, worker_message

    # A value quoted from a file (a tensor's text, a string holding line breaks) may span lines.
    message = worker_message(" ".join(message.split()) if "\n" in message or "\r" in message else message, exc)
    click.echo(f"error: {worker_label()}{message}", err=True)
    record_error(message, exc)
