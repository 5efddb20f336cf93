"""`python -m enrichflow ...` is the `enrichflow` command."""

import sys

from enrichflow.cli import main

sys.exit(main())
