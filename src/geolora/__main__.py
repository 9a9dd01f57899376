"""``python -m geolora ...`` runs the ``geolora`` command."""

import sys

from .app.cli import main

sys.exit(main())
