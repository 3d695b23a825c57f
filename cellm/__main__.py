import sys

from cellm.cli import main

sys.exit(main())
