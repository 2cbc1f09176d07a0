import sys

from jaxtx.cli import main

sys.exit(main())
