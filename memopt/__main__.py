"""`python -m memopt`: the same as the `memopt` command."""

import sys

from memopt.cli import main

sys.exit(main())
