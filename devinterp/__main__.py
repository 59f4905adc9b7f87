import sys

from devinterp.cli import main

sys.exit(main())
