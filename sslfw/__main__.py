import sys

from sslfw.cli import main

sys.exit(main())
