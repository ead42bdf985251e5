"""python -m mpillm COMMAND ... : the same as the ``mpillm`` console script."""
import sys

from mpillm.cli import main

sys.exit(main())
