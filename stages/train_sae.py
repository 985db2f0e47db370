"""DVC stage `train_sae`: thin entry point; saelab.preflight's checks, then the work in
saelab.sae.train."""
from saelab import preflight
from saelab.sae.train import main

if __name__ == "__main__":
    preflight.main("train_sae")
    main()
