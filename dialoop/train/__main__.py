"""`python -m dialoop.train STAGE ...` runs `dialoop train STAGE ...` (for `accelerate launch -m`)."""

import sys

from dialoop.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="dialoop train")
