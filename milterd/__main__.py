import sys

from milterd.cli import main

sys.exit(main())
