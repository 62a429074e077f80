import sys

from proxyctl.cli import main

sys.exit(main())
