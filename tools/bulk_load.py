"""The offline bulk loader: ``python tools/bulk_load.py INDEX INPUT [options]``.

The same program as the installed commands ``cypq-bulk-load`` and ``cypq build`` (one
implementation, in cypq/bulk.py and cypq/cli.py); ``--help`` lists the options.
"""
import sys

from cypq.cli import bulk_load_main

if __name__ == "__main__":
    raise SystemExit(bulk_load_main(sys.argv[1:]))
