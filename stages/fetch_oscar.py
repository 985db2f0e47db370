"""DVC stage `fetch_oscar`: thin entry point; the work is in saelab.corpus."""
from saelab.corpus import main

if __name__ == "__main__":
    main()
