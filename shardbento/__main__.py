"""Entry point for `python -m shardbento`."""

import sys

from shardbento.cli import main

sys.exit(main())
