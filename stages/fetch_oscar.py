"""DVC stage `fetch_oscar`: thin entry point; saelab.preflight's checks, then the work in
saelab.data.corpus."""
from saelab import preflight
from saelab.data.corpus import main

if __name__ == "__main__":
    preflight.main("fetch_oscar")
    main()
