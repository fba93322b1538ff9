"""One error type for bad input, so every message names the file, the record and the field."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional


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


@contextmanager
def printed_input_errors() -> Iterator[None]:
    """For Hydra entry points: print a LeverPlusInputError as one ``[leverplus] error: ...`` line on stderr, then
    re-raise (Hydra reports the failure and exits non-zero)."""
    try:
        yield
    except LeverPlusInputError as e:
        print(f"[leverplus] error: {e}", file=sys.stderr)
        raise
