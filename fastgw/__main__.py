import sys

from fastgw.runtime.cli import main

sys.exit(main())
