"""Tools that need both sides of fmc: an artifact (the runtime) and its source checkpoint (the
frontend), e.g. `fmc compare`. The runtime itself never imports the frontend."""
