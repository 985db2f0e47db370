"""DVC stage `fit_scaling_laws`: thin entry point; the work is in saelab.scaling."""
from saelab.scaling import main

if __name__ == "__main__":
    main()
