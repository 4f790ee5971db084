"""``python -m apt_salience.cli``: the same as the ``apt-salience`` console script."""

import sys

from . import main

sys.exit(main())
