"""DVC stage `fetch_model`: thin entry point; the work is in saelab.data.base_model."""
from saelab.data.base_model import main

if __name__ == "__main__":
    main()
