"""``python -m teia`` runs the command line."""

import sys

from teia.cli import main

sys.exit(main())
