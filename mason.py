"""`python mason.py ...` from a checkout: the same as `open-instruct-sft mason ...` (open_instruct/mason.py)."""

import sys

from open_instruct.mason import main

if __name__ == "__main__":
    sys.exit(main())
