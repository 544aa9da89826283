import sys

from lssgen.cli.main import main

sys.exit(main())
