"""How every stage ends: ``python -m pipeline.<stage>`` is ``sys.exit(stage.run("<stage>", main))``.

Exit codes (the README's table):

====  ============================================================================================
0     done (including "the challenger lost": a decision, not a failure; and a reader of stdout that left
      early, ``| head``)
1     a gate refused the result (export's parity gate, quantize's accuracy gates); nothing written
2     bad input the message names: params.yaml, a missing upstream output, a version that cannot be
      served, a bad command-line value
3     a store is unusable: MLflow down, unreachable (a failed connection) or moved, or a lock (the
      registry's, the BentoML store's) still held after its timeout; retry once it is back; the
      stage's outputs are as before
4     the file system refused a write (disk full, file too large, permissions); outputs as before
====  ============================================================================================

A stage raises :class:`StageError` (exit 2) or :class:`StoreError` (exit 3), or a subclass, and
:func:`run` turns it into one ``<stage>: error: ...`` line; no traceback reaches the user for them.
No imports of other pipeline modules: the error classes of every module derive from these.
"""
from __future__ import annotations

import os
import select
import sys
from typing import Callable

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_STORE, EXIT_OS = 0, 1, 2, 3, 4


class StageError(Exception):
    """Bad input; the message names it (exit 2)."""


class StoreError(RuntimeError):
    """The tracking store cannot be used now; the message names the store (exit 3)."""


def run(stage: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit code; the errors of the table above as one line on stderr and their code."""
    try:
        return main(argv)
    except BrokenPipeError as err:
        if not stdout_reader_left():  # another pipe or socket: an OSError like any other
            print(f"{stage}: error: {err}", file=sys.stderr)
            return EXIT_STORE
        # `imgcls models | head`: the reader has left; leave quietly too (no flush error at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (StoreError, TimeoutError) as err:  # TimeoutError: a lock (pipeline.atomic.locked) still held
        print(f"{stage}: error: {err}", file=sys.stderr)
        return EXIT_STORE
    except (StageError, FileNotFoundError) as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as err:  # outputs are written atomically (pipeline.atomic): nothing half-written stays
        print(f"{stage}: error: {err}", file=sys.stderr)
        return EXIT_STORE if _is_network(err) else EXIT_OS


def stdout_reader_left() -> bool:
    """stdout is a pipe (or socket) whose reader has closed it: ``poll`` reports an error on it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), stdout closed or replaced
        return False


def _is_network(err: OSError) -> bool:
    """A connection failure (requests' and urllib3's errors are OSErrors too): a store problem, not the disk's."""
    return isinstance(err, ConnectionError) or type(err).__module__.split(".")[0] in ("requests", "urllib3", "http")
