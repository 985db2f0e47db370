"""`python -m saelab.interpret` runs the interpret stage."""
from .stage import main

main()
