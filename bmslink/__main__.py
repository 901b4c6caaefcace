import sys

from bmslink.cli import main

sys.exit(main())
