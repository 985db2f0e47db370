"""DVC stage `fit_scaling_laws`: thin entry point; saelab.preflight's checks, then the work in
saelab.scaling.laws."""
from saelab import preflight
from saelab.scaling.laws import main

if __name__ == "__main__":
    preflight.main("fit_scaling_laws")
    main()
