"""DVC stage `fetch_model`: thin entry point; saelab.preflight's checks, then the work in
saelab.data.base_model."""
from saelab import preflight
from saelab.data.base_model import main

if __name__ == "__main__":
    preflight.main("fetch_model")
    main()
