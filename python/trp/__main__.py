"""`python -m trp ...`: the `trp` command line (trp.app.cli)."""
import sys

from trp.app.cli import main

sys.exit(main())
