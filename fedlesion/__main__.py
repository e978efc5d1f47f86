import sys

from fedlesion.cli import main

if __name__ == "__main__":  # multiprocessing's spawn re-imports the main module in each worker process
    sys.exit(main())
