import sys

from shoal.controller.main import main

if __name__ == "__main__":
    sys.exit(main())
