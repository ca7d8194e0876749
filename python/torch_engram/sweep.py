"""`python -m torch_engram.sweep ...` (or `torchrun --nproc-per-node N -m torch_engram.sweep ...`):
the rho allocation sweep, torch_engram.experiment.sweep. Not imported by the library itself."""

from .experiment.sweep import main

if __name__ == "__main__":
    main()
