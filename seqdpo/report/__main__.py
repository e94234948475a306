import sys

from seqdpo.report.cli import main

sys.exit(main())
