"""DVC stage `fetch_model`: thin entry point; the work is in saelab.base_model."""
from saelab.base_model import main

if __name__ == "__main__":
    main()
