import sys

from fedlesion.cli import main

sys.exit(main())
