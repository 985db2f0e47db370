"""DVC stage `fit_scaling_laws`: thin entry point; the work is in saelab.scaling.laws."""
from saelab.scaling.laws import main

if __name__ == "__main__":
    main()
