"""``python -m leverplus.inspect_data FILE [FILE ...]``: a data-quality report (code in
:mod:`leverplus.datagen.inspect_data`)."""

from leverplus.datagen.inspect_data import main

if __name__ == "__main__":
    raise SystemExit(main())
