"""DVC stage `extract_mlp8`: thin entry point; the work is in saelab.activations.extract."""
from saelab.activations.extract import main

if __name__ == "__main__":
    main()
