"""`python -m dialoop.cli ARGS` runs `dialoop ARGS` (`accelerate launch -m dialoop.cli train STAGE ...`)."""

from dialoop.cli import app

if __name__ == "__main__":
    app(prog_name="dialoop")
