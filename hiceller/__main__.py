import sys

from hiceller.cli import main

sys.exit(main())
