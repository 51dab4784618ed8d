"""``python -m jaxquant``: the main job, ``jaxquant.cli.main`` (``--help`` lists the options)."""

import sys

from jaxquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
