import sys

from fastgw.cli import main

sys.exit(main())
