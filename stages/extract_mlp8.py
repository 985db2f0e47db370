"""DVC stage `extract_mlp8`: thin entry point; the work is in saelab.extract."""
from saelab.extract import main

if __name__ == "__main__":
    main()
