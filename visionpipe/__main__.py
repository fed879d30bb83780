"""`python -m visionpipe` (also what torchrun launches)."""

from visionpipe.cli import main

if __name__ == "__main__":
    main()
