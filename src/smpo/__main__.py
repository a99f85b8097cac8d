import sys

from smpo.cli import main

sys.exit(main())
