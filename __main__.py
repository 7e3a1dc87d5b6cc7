import sys

from .extension.standalone.cli import main

sys.exit(main())
