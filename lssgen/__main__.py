import sys

from lssgen.cli import main

sys.exit(main())
