"""DVC stage `train_sae`: thin entry point; the work is in saelab.sae.train."""
from saelab.sae.train import main

if __name__ == "__main__":
    main()
