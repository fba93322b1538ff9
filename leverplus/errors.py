"""One error type for bad input, so every message names the file, the record and the field."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


class LeverPlusInputError(ValueError):
    """Bad input: malformed file, wrong shape, out-of-range pointer, NaN, unknown option...

    The message always has the form
    ``<file>: record <record>: field <field>: <problem>. <how to fix>`` (parts that do not apply are left out).
    """

    def __init__(
        self,
        problem: str,
        *,
        file: Optional[str] = None,
        record: Optional[str] = None,
        field: Optional[str] = None,
        fix: Optional[str] = None,
    ) -> None:
        self.file, self.record, self.field, self.problem, self.fix = file, record, field, problem, fix
        parts = []
        if file is not None:
            parts.append(str(file))
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field {field!r}")
        msg = ": ".join(parts + [problem]) if parts else problem
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


#: exit status of an entry point that stopped on bad input (argparse and Hydra use 2 for usage errors too)
INPUT_ERROR_EXIT_STATUS = 2


def _in_multirun() -> bool:
    """True inside a job of a Hydra multirun, where the sweeper (not this process) decides what a failure means."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def printed_input_errors() -> Iterator[None]:
    """For entry points: a LeverPlusInputError becomes one ``[leverplus] error: ...`` line on stderr and exit status
    2, with no traceback (the message already names the file, record, field and fix). ``HYDRA_FULL_ERROR=1`` keeps
    the traceback; inside a multirun job the error is re-raised so the sweeper records the failed job."""
    try:
        yield
    except LeverPlusInputError as e:
        print(f"[leverplus] error: {e}", file=sys.stderr)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_multirun():
            raise
        raise SystemExit(INPUT_ERROR_EXIT_STATUS) from None
