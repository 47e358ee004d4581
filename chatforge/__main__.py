import sys

from chatforge.cli import main

if __name__ == "__main__":  # `python -m chatforge`; importing the module runs nothing
    sys.exit(main())
