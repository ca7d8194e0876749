"""`python -m torch_engram.analyze gate|logit-lens|cka ...`: what the memory of saved sweep models
does (torch_engram.experiment.analysis). Not imported by the library itself."""

from .experiment.analysis import main

if __name__ == "__main__":
    main()
