"""DVC stage `fetch_oscar`: thin entry point; the work is in saelab.data.corpus."""
from saelab.data.corpus import main

if __name__ == "__main__":
    main()
