"""DVC stage `train_sae`: thin entry point; the work is in saelab.train."""
from saelab.train import main

if __name__ == "__main__":
    main()
