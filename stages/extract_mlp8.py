"""DVC stage `extract_mlp8`: thin entry point; saelab.preflight's checks, then the work in
saelab.activations.extract."""
from saelab import preflight
from saelab.activations.extract import main

if __name__ == "__main__":
    preflight.main("extract_mlp8")
    main()
