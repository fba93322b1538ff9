"""``python -m leverplus.compare --sweep NAME``: the comparison of a sweep against its baseline, from MLflow.

The command lives here so that users type the same thing as always; the code is :mod:`leverplus.analysis.compare`.
"""

from leverplus.analysis.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
