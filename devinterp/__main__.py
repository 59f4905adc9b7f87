import sys

from devinterp.cli.main import main

sys.exit(main())
