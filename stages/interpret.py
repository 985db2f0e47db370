"""DVC stage `interpret`: thin entry point; the work is in saelab.interpret.stage."""
from saelab.interpret.stage import main

if __name__ == "__main__":
    main()
