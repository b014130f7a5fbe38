"""``python -m latentsearch`` runs the ``latentsearch`` command."""

import sys

from latentsearch.cli import main

sys.exit(main())
