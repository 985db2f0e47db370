"""DVC stage `interpret`: thin entry point; saelab.preflight's checks, then the work in
saelab.interpret.stage."""
from saelab import preflight
from saelab.interpret.stage import main

if __name__ == "__main__":
    preflight.main("interpret")
    main()
